"""Small generated datasets with a known structure, for tests, demos and quick pipeline runs.

Items belong to topics and their titles use that topic's words, so a text encoder places same-topic
items together. Each user prefers one or two topics and mostly interacts with items of those topics,
so a recommender that learns anything beats random by a wide margin. Some items appear only after the
temporal cut-off (cold-start) and popularity is skewed (a long tail), as in real logs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from learn_tasks import schema as S

TOPICS: dict[str, list[str]] = {
    "cooking": ["recipes", "kitchen", "baking", "bread", "soup", "chef", "pasta", "spices"],
    "space": ["galaxy", "rocket", "planets", "astronaut", "orbit", "stars", "telescope", "mars"],
    "history": ["empire", "ancient", "war", "kings", "revolution", "medieval", "rome", "dynasty"],
    "gardening": ["roses", "garden", "soil", "seeds", "flowers", "orchard", "compost", "herbs"],
    "programming": ["python", "algorithms", "code", "software", "compilers", "data", "linux", "rust"],
    "romance": ["love", "heart", "wedding", "passion", "kiss", "summer", "letters", "promise"],
    "mystery": ["detective", "murder", "clue", "secret", "crime", "shadow", "island", "case"],
    "fitness": ["running", "yoga", "strength", "marathon", "muscle", "diet", "training", "health"],
}
_SHAPES = ["The {a} of {b}", "{a} and {b}", "A Guide to {a} {b}", "{a}: {b} for Everyone", "My {a} {b}"]


@dataclass(frozen=True)
class SynthSpec:
    n_users: int = 300
    n_items: int = 400
    events_per_user: tuple[int, int] = (5, 30)
    topics_per_user: int = 1
    on_topic: float = 0.9
    cold_items: float = 0.05  # share of items that only appear in the last 10% of time
    seed: int = 0
    start: str = "2020-01-01"
    days: int = 365


def make(spec: SynthSpec = SynthSpec()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return canonical (interactions, items) frames."""
    rng = np.random.default_rng(spec.seed)
    topics = list(TOPICS)
    item_topic = rng.integers(0, len(topics), size=spec.n_items)
    titles = []
    for i, t in enumerate(item_topic):
        a, b = rng.choice(TOPICS[topics[t]], size=2, replace=False)
        titles.append(_SHAPES[i % len(_SHAPES)].format(a=a.title(), b=b.title()) + f" Vol. {i % 7 + 1}")
    item_ids = np.arange(100, 100 + spec.n_items, dtype=np.int64)
    items = pd.DataFrame({S.ITEM_ID: item_ids, S.TITLE: titles,
                          S.CATEGORY: [topics[t].title() for t in item_topic]})
    n_cold = int(round(spec.cold_items * spec.n_items))
    cold = set(rng.choice(spec.n_items, size=n_cold, replace=False).tolist()) if n_cold else set()
    # Zipf-like popularity within each topic gives head and long-tail items.
    pop = 1.0 / np.arange(1, spec.n_items + 1) ** 0.8
    pop = pop[rng.permutation(spec.n_items)]
    t0 = pd.Timestamp(spec.start, tz="UTC")
    span = spec.days * 86400
    cut = int(0.9 * span)
    rows = []
    for u in range(spec.n_users):
        liked = rng.choice(len(topics), size=spec.topics_per_user, replace=False)
        n = int(rng.integers(spec.events_per_user[0], spec.events_per_user[1] + 1))
        start = int(rng.integers(0, int(span * 0.8)))
        times = np.sort(rng.integers(start, span, size=n))
        for ts in times:
            on = rng.random() < spec.on_topic
            mask = np.isin(item_topic, liked) if on else ~np.isin(item_topic, liked)
            if ts < cut and cold:
                mask = mask & ~np.isin(np.arange(spec.n_items), list(cold))
            cand = np.flatnonzero(mask)
            if len(cand) == 0:
                cand = np.arange(spec.n_items)
            p = pop[cand] / pop[cand].sum()
            rows.append((1000 + u, int(item_ids[rng.choice(cand, p=p)]), ts))
    inter = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, "secs"])
    inter[S.EVENT_TIMESTAMP] = t0 + pd.to_timedelta(inter.pop("secs"), unit="s")
    inter[S.EVENT_TIMESTAMP] = inter[S.EVENT_TIMESTAMP].dt.floor("s")
    return inter, items


def write_seqrec(folder: str | Path, spec: SynthSpec = SynthSpec()) -> Path:
    """Write the generated data in the SeqRec CSV layout (what `learn data prepare --format seqrec` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inter, items = make(spec)
    out = inter.sort_values([S.USER_ID, S.EVENT_TIMESTAMP], kind="stable")
    pd.DataFrame({"user_id": out[S.USER_ID], "item_id": out[S.ITEM_ID],
                  "timestamp": out[S.EVENT_TIMESTAMP].astype("int64") // 10**9}).to_csv(
        folder / "interactions.csv", index=False)
    items[[S.ITEM_ID, S.TITLE]].to_csv(folder / "items.csv", index=False, quoting=1)
    return folder
