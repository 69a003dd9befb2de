"""Training: loss values on hand-built batches, accidental hits, batching, and tiny real training runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from learn_tasks.data import datasets as data
from learn_tasks.data import splits
from learn_tasks.evaluation import harness
from learn_tasks.pch import catalogue, kinds, registry
from learn_tasks.training import batches, train
from learn_tasks import schema as S
from learn_tasks.config import MODEL_CONFIG_DIR, MODEL_KINDS
from learn_tasks.pch.model import load_checkpoint
from learn_tasks.pch.catalogue import Catalogue
from learn_tasks.pch.losses import bce_loss, dense_all_action_loss, full_softmax_loss, next_item_loss
from learn_tasks.training.batches import length_buckets


def topic_embeddings(cfg, dataset: str, dim: int = 24, noise: float = 0.5, seed: int = 0):
    """Stand-in content embeddings: a random direction per synth topic plus per-item noise."""
    items = data.load_items(cfg, dataset)
    rng = np.random.default_rng(seed)
    topics = {t: i for i, t in enumerate(sorted(items[S.CATEGORY].astype(str).unique()))}
    centres = rng.normal(size=(len(topics), dim))
    emb = centres[items[S.CATEGORY].astype(str).map(topics).to_numpy()] + noise * rng.normal(size=(len(items), dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return items[S.ITEM_ID].to_numpy(np.int64), emb.astype(np.float32)


def small(settings, **train):
    return settings.with_overrides(
        model={"d_model": 32, "n_layers": 1, "n_heads": 2, "dropout": 0.0, "max_len": 20},
        train={"batch_size": 32, "lr": 3e-3, "n_random_negatives": 64, "temperature": 0.1, "val_users": 100,
               "patience": 2, "threads": 1, **train})


# --------------------------------------------------------------------------------------------- losses
def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_dense_all_action_loss_on_a_hand_built_batch():
    user = t([[[1.0, 0.0]], [[0.6, 0.8]]])  # B=2, H=1
    items = t([[[0.6, 0.8]], [[0.0, 1.0]]])  # T=1
    ids = torch.tensor([[5], [7]])
    ones = torch.ones(2, 1, dtype=torch.bool)
    loss = dense_all_action_loss(user, ones, items, ids, ones, temperature=0.5)
    # user 0: positive 0.6/0.5 = 1.2, its negative (user 1's target) 0.0; user 1: positive 1.6, negative 2.0
    expected = (math.log(1 + math.exp(0.0 - 1.2)) + math.log(1 + math.exp(2.0 - 1.6))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_dense_all_action_masks_accidental_hits():
    user = t([[[1.0, 0.0]], [[0.6, 0.8]]])
    items = t([[[0.6, 0.8]], [[0.0, 1.0]]])
    ones = torch.ones(2, 1, dtype=torch.bool)
    same = torch.tensor([[5], [5]])  # both users' target is item 5: neither is the other's negative
    loss = dense_all_action_loss(user, ones, items, same, ones, temperature=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # no negative left: -log(1) = 0
    # an extra random negative that is the user's own target is masked too
    neg = t([[0.6, 0.8], [1.0, 0.0]])
    with_neg = dense_all_action_loss(user, ones, items, same, ones, 0.5, neg, torch.tensor([5, 9]))
    # item 9 = [1, 0] scores 1.0/0.5 for user 0 and 0.6/0.5 for user 1 (positive 0.8/0.5)
    expected = (math.log(1 + math.exp(2.0 - 1.2)) + math.log(1 + math.exp(1.2 - 1.6))) / 2
    assert with_neg.item() == pytest.approx(expected, abs=1e-5)


def reference_dense_loss(user, uvalid, items, ids, ivalid, tau, neg=None, neg_ids=None):
    """The loss written as loops over every positive pair, for comparison."""
    B, H, _ = user.shape
    T = items.shape[1]
    total, count = 0.0, 0
    for b in range(B):
        own = {int(ids[b, t]) for t in range(T) if ivalid[b, t]}
        for h in range(H):
            if not uvalid[b, h]:
                continue
            negs = [float(user[b, h] @ items[c, s]) / tau for c in range(B) for s in range(T)
                    if c != b and ivalid[c, s] and int(ids[c, s]) not in own]
            if neg is not None:
                negs += [float(user[b, h] @ neg[r]) / tau for r in range(len(neg)) if int(neg_ids[r]) not in own]
            for tt in range(T):
                if ivalid[b, tt]:
                    pos = float(user[b, h] @ items[b, tt]) / tau
                    total += -pos + math.log(math.exp(pos) + sum(math.exp(x) for x in negs))
                    count += 1
    return total / count


def test_dense_all_action_matches_the_loop_reference_with_padding_and_duplicates():
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 4, 3, 3, 5
    user = torch.nn.functional.normalize(torch.randn(B, H, D, generator=g), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(B, T, D, generator=g), dim=-1)
    ids = torch.tensor([[1, 2, 3], [3, 4, 0], [5, 6, 7], [1, 8, 9]])
    uvalid = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    ivalid = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    neg = torch.nn.functional.normalize(torch.randn(3, D, generator=g), dim=-1)
    neg_ids = torch.tensor([2, 10, 11])
    got = dense_all_action_loss(user, uvalid, items, ids, ivalid, 0.2, neg, neg_ids)
    want = reference_dense_loss(user, uvalid, items, ids, ivalid, 0.2, neg, neg_ids)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_next_item_loss_hand_value_and_accidental_hit():
    query = t([[1.0, 0.0]])
    pos = t([[0.6, 0.8]])
    cand = t([[0.0, 1.0], [0.6, 0.8]])
    loss = next_item_loss(query, pos, torch.tensor([4]), cand, torch.tensor([9, 4]), temperature=1.0)
    # candidate 4 is the positive itself and is masked; the only negative scores 0.0
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.0 - 0.6)), abs=1e-6)


def test_bce_loss_hand_value_and_masked_accidental_hits():
    query, pos = t([[1.0, 0.0]]), t([[0.6, 0.8]])
    neg = t([[[0.0, 1.0], [0.6, 0.8]]])  # [P=1, M=2, D]: the second negative is the positive itself
    # SASRec: mean over positives of -log sigmoid(s+) plus mean over negatives of -log(1 - sigmoid(s-))
    both = bce_loss(query, pos, neg, temperature=1.0)
    assert both.item() == pytest.approx(math.log(1 + math.exp(-0.6)) + (math.log(2) + math.log(1 + math.exp(0.6))) / 2,
                                        abs=1e-6)
    masked = bce_loss(query, pos, neg, temperature=1.0, neg_valid=torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(math.log(1 + math.exp(-0.6)) + math.log(2), abs=1e-6)
    sharp = bce_loss(query, pos, neg[:, :1], temperature=0.5)  # logits divided by the temperature
    assert sharp.item() == pytest.approx(math.log(1 + math.exp(-1.2)) + math.log(2), abs=1e-6)


def test_full_softmax_loss_is_cross_entropy_over_every_item():
    query, items = t([[1.0, 0.0]]), t([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    loss = full_softmax_loss(query, items, torch.tensor([0]), temperature=1.0)
    assert loss.item() == pytest.approx(-0.6 + math.log(math.exp(0.6) + 1 + math.exp(-1)), abs=1e-6)
    no_third = full_softmax_loss(query, items, torch.tensor([0]), 1.0, exclude=torch.tensor([False, False, True]))
    assert no_third.item() == pytest.approx(-0.6 + math.log(math.exp(0.6) + 1), abs=1e-6)


def test_a_constant_logq_changes_nothing():
    g = torch.Generator().manual_seed(1)
    q, p, c = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    pid, cid = torch.arange(5), torch.arange(10, 17)
    base = next_item_loss(q, p, pid, c, cid, 0.5)
    shifted = next_item_loss(q, p, pid, c, cid, 0.5, torch.full((5,), 2.0), torch.full((7,), 2.0))
    assert shifted.item() == pytest.approx(base.item(), rel=1e-6)
    skewed = next_item_loss(q, p, pid, c, cid, 0.5, torch.zeros(5), torch.linspace(-5, 5, 7))
    assert abs(skewed.item() - base.item()) > 1e-2


# -------------------------------------------------------------------------------------------- batches
def test_length_buckets_cover_every_sequence_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, size=1000)
    batches = length_buckets(lengths, 64, rng)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    spread = [lengths[b].max() - lengths[b].min() for b in batches]
    assert max(spread) <= 5  # random batches would span ~49
    assert [len(b) for b in batches].count(64) == 15
    assert not np.array_equal(np.concatenate(length_buckets(lengths, 64, rng)), flat)  # order is shuffled


def test_dense_batches_put_history_strictly_before_targets():
    rng = np.random.default_rng(0)
    seqs = [np.arange(100 * i, 100 * i + n) for i, n in enumerate([2, 5, 30, 80, 7])]  # rows grow with time
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    sq = batches.Sequences(np.arange(5), offsets, np.concatenate(seqs))
    seen = 0
    for b in batches.dense_batches(sq, max_len=20, batch_size=2, n_history=4, n_target=3, rng=rng):
        for j in range(len(b["hist"])):
            h = b["hist"][j][b["hist_mask"][j]]
            tg = b["tgt"][j][b["tgt_valid"][j]]
            assert 1 <= len(h) <= 20 and 1 <= len(tg) <= 3
            assert np.all(np.diff(h) == 1)  # a contiguous, most recent window before the cut
            assert tg.min() > h.max() and tg.max() // 100 == h[0] // 100
            assert np.all(b["hsel"][j][b["hsel_valid"][j]] < len(h))
            seen += 1
    assert seen == 5


# ------------------------------------------------------------------------------------ training runs
def test_tiny_training_run_learns_the_topic_pattern(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    cfg = small(settings, lr=5e-3, patience=20, early_stop_metric="recall@10")
    result = train.train_model(cfg, synth_dataset, "loo", "learn", epochs=15, embeddings=emb)
    run_dir = result["run_dir"]
    assert result["stopped"] in ("epochs", "early_stopping") and result["sequences_per_s"] > 0
    for name in ("model.safetensors", "config.json", "items.parquet", "meta.json", "train_log.jsonl"):
        assert (registry.latest(settings, synth_dataset, "learn", "loo") / name).exists(), name
    metrics = harness.evaluate_run(cfg, synth_dataset, "loo", "learn", run_dir=run_dir, embeddings=emb)
    n_items = metrics["meta"]["items"]
    random_recall = 10 / n_items
    assert metrics["all"]["recall@10"] > 3 * random_recall, metrics["all"]


@pytest.mark.parametrize("kind", ["sasrec", "learn_hybrid"])
def test_other_kinds_train_and_evaluate(settings, synth_dataset, kind):
    emb = topic_embeddings(settings, synth_dataset)
    cfg = small(settings)
    result = train.train_model(cfg, synth_dataset, "temporal", kind, epochs=2, embeddings=emb)
    assert result["kind"] == kind and result["id_vocab"] > 0
    m = harness.evaluate_run(cfg, synth_dataset, "temporal", kind, embeddings=emb)
    assert 0.0 <= m["all"]["recall@200"] <= 1.0 and "future" in m


def test_checkpoint_vocab_marks_unseen_items_unknown(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        res = train.train_model(small(settings), synth_dataset, "temporal", "learn_hybrid", epochs=1, embeddings=emb)
        # train.threads (1) held for the run only: the caller's stages after it get their threads back
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    vocab = pd.read_parquet(f"{res['run_dir']}/items.parquet")
    split = splits.load_split(settings, synth_dataset, "temporal")
    seen = set(split.loc[split[S.SPLIT] == S.TRAIN, S.ITEM_ID])
    assert ((vocab["item_idx"] > 0) == vocab[S.ITEM_ID].isin(seen)).all()
    assert (vocab[S.IS_COLD_START] == ~vocab[S.ITEM_ID].isin(seen)).all()
    assert vocab.loc[vocab["item_idx"] > 0, "item_idx"].is_unique


def test_nan_loss_stops_and_keeps_the_last_good_weights(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    res = train.train_model(small(settings, lr=1e30, grad_clip=0.0, warmup_steps=1), synth_dataset, "loo", "learn",
                    epochs=3, embeddings=emb)
    assert res["stopped"] == "nan_loss"
    model, _ = load_checkpoint(res["run_dir"])
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_budget_warm_start_and_empty_validation(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    first = train.train_model(small(settings), synth_dataset, "loo", "learn_hybrid", epochs=50, budget_s=0.01, embeddings=emb)
    assert first["stopped"] == "budget" and first["epochs_run"] == 1
    second = train.train_model(small(settings), synth_dataset, "loo", "learn_hybrid", epochs=1, embeddings=emb,
                       warm_start=first["run_dir"])
    a, _ = load_checkpoint(first["run_dir"])
    b, _ = load_checkpoint(second["run_dir"])
    assert second["run_dir"] != first["run_dir"]
    assert not torch.equal(a.adaptor.weight, b.adaptor.weight)  # it trained on from there
    # no validation window (valid cut-off == test cut-off): training still runs and keeps its last epoch
    cfg = small(settings).with_overrides(data={"temporal_valid_quantile": 0.9, "temporal_test_quantile": 0.9})
    res = train.train_model(cfg, synth_dataset, "temporal", "learn", epochs=2, embeddings=emb)
    assert res["val_users"] == 0 and res["val"] is None and res["epochs_run"] == 2


def test_items_missing_from_the_embedding_store_are_listed(settings, synth_dataset):
    ids, vecs = topic_embeddings(settings, synth_dataset)
    with pytest.raises(ValueError, match=r"3 item\(s\).*no content embedding.*learn encode"):
        train.train_model(small(settings), synth_dataset, "loo", "learn", epochs=1, embeddings=(ids[3:], vecs[3:]))


def test_only_training_encodes_missing_items_and_only_when_asked(settings, synth_dataset, monkeypatch):
    ids, vecs = topic_embeddings(settings, synth_dataset)
    stored = {"ids": ids[3:], "vecs": vecs[3:]}  # the CEG store lacks 3 items
    monkeypatch.setattr(catalogue.store, "load_embeddings", lambda cfg, ds, fp=None: (stored["ids"], stored["vecs"]))
    monkeypatch.setattr(catalogue.store, "current_fingerprint", lambda cfg, ds: "fp0")
    calls = []

    def encode_catalogue(cfg, dataset):
        calls.append(dataset)
        stored.update(ids=ids, vecs=vecs)

    monkeypatch.setattr(train, "encode_catalogue", encode_catalogue)
    with pytest.raises(catalogue.MissingContent, match=r"3 item\(s\).*encode_missing"):
        train.train_model(small(settings), synth_dataset, "loo", "learn", epochs=1)
    assert calls == []  # building a catalogue never encodes
    res = train.train_model(small(settings, encode_missing=True), synth_dataset, "loo", "learn", epochs=1)
    assert calls == [synth_dataset] and res["embedding_fingerprint"] == "fp0"


def test_sasrec_needs_no_embeddings_and_rejects_unknown_kinds(settings, synth_dataset):
    res = train.train_model(small(settings), synth_dataset, "loo", "sasrec", epochs=1)
    assert res["embedding_fingerprint"] is None
    with pytest.raises(ValueError, match="cannot train"):
        train.train_model(small(settings), synth_dataset, "loo", "popular")


def test_registry_latest_and_promotion(settings, synth_dataset):
    assert registry.promoted(settings, synth_dataset) is None
    res = train.train_model(small(settings), synth_dataset, "loo", "sasrec", epochs=1)
    run = registry.latest(settings, synth_dataset, kind="sasrec", protocol="loo")
    assert str(run) == res["run_dir"]
    assert registry.latest(settings, synth_dataset, kind="sasrec", protocol="temporal") is None
    registry.promote(settings, synth_dataset, run)
    assert registry.promoted(settings, synth_dataset) == run
    with pytest.raises(ValueError, match="not a complete run"):
        registry.promote(settings, synth_dataset, run.parent / "nope")


def test_cold_items_take_the_unknown_embedding_path_at_inference(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    res = train.train_model(small(settings), synth_dataset, "temporal", "learn_hybrid", epochs=1, embeddings=emb)
    split = splits.load_split(settings, synth_dataset, "temporal")
    scorer = harness.make_scorer(settings, synth_dataset, "temporal", "learn_hybrid", split,
                                  run_dir=Path(res["run_dir"]), embeddings=emb)
    cat = scorer.cat
    cold = np.flatnonzero(cat.popularity == 0)
    assert len(cold) and (cat.item_idx[cold] == 0).all() and (cat.item_idx[cat.popularity > 0] > 0).all()
    model, _ = load_checkpoint(res["run_dir"])
    cases = harness.build_cases(split, cat, "temporal", S.TEST)
    _, items = harness.model_vectors(model, cat, cases)
    with torch.no_grad():
        content_only = model.encode_items(torch.as_tensor(cat.content[cold]), None).numpy()
    np.testing.assert_allclose(items[cold], content_only, atol=1e-5)
    # evidence weighting (on by default): counts per ID row are the training events, and a cold item's
    # vector is its content pathway alone, [0, v']
    assert model.config.mix_k > 0 and items.shape[1] == 2 * model.config.out_dim
    warm = cat.popularity > 0
    np.testing.assert_array_equal(model.id_count.numpy()[cat.item_idx[warm]], cat.popularity[warm])
    assert model.id_count[0] == 0 and np.abs(items[cold][:, :model.config.out_dim]).max() == 0
    assert np.abs(items[warm][:, :model.config.out_dim]).max() > 0


def test_users_with_one_training_event_are_not_sequences():
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    df = pd.DataFrame({S.USER_ID: [1, 1, 1, 2, 3, 3], S.ITEM_ID: [10, 11, 12, 10, 12, 10],
                       S.EVENT_TIMESTAMP: [t0 + pd.Timedelta(days=d) for d in (2, 0, 1, 0, 0, 1)]})
    ids = np.array([10, 11, 12])
    cat = Catalogue(ids, None, np.arange(1, 4), np.ones(3, np.int64))
    seqs, skipped = batches.build_sequences(df, cat)
    assert skipped == 1 and seqs.user_ids.tolist() == [1, 3]
    assert ids[seqs.seq(0)].tolist() == [11, 12, 10]  # time order
    assert ids[seqs.seq(1)].tolist() == [12, 10]


def test_learning_rate_warms_up_then_follows_the_step_schedule():
    assert train.lr_at(0, 1000, 1.0, warmup=10) == pytest.approx(0.1)
    assert train.lr_at(9, 1000, 1.0, warmup=10) == pytest.approx(1.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.009))))
    assert train.lr_at(500, 1000, 1.0, warmup=10) == pytest.approx(0.55)
    assert train.lr_at(1000, 1000, 1.0, warmup=10) == pytest.approx(0.1)
    assert train.lr_at(3000, 1000, 1.0, warmup=10) == pytest.approx(0.1)  # never below the floor
    assert train.lr_at(4, 1000, 2.0, warmup=10, schedule="constant") == pytest.approx(1.0)  # still warming up
    assert train.lr_at(900, 1000, 2.0, warmup=10, schedule="constant") == pytest.approx(2.0)


def test_a_wall_clock_budget_never_changes_the_schedule(settings, synth_dataset, monkeypatch):
    """A slow machine (a clock that runs fast) may stop a run, but every step it takes has the learning
    rate and the weights of the same run on an idle machine."""
    cfg = small(settings, warmup_steps=1, patience=10,
                per_model={"sasrec": {"train": {"lr_schedule": "cosine", "batch_size": 32}}})
    idle = train.train_model(cfg, synth_dataset, "loo", "sasrec", epochs=3)
    clock = {"t": 0.0}

    def busy() -> float:
        clock["t"] += 0.05  # every reading of the clock: 50 ms later
        return clock["t"]

    monkeypatch.setattr(train.time, "perf_counter", busy)
    slow = train.train_model(cfg, synth_dataset, "loo", "sasrec", epochs=3, budget_s=1e6)
    read = lambda r: [json.loads(x) for x in (Path(r["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
    for a, b in zip(read(idle), read(slow)):
        assert a["lr"] == b["lr"] and a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    stopped = train.train_model(cfg, synth_dataset, "loo", "sasrec", epochs=3, budget_s=0.2)
    assert stopped["stopped"] == "budget" and stopped["steps"] < idle["steps"]
    first = read(stopped)[0]
    base = kinds.resolve(cfg, "sasrec").train.lr
    assert first["lr"] == pytest.approx(train.lr_at(first["step"] - 1, idle["steps"], base, 1))


@pytest.mark.parametrize("loss, similarity", [("bce", "dot"), ("full_softmax", "cosine"), ("sampled_softmax", "cosine")])
def test_sasrec_trains_with_every_next_item_loss(settings, synth_dataset, loss, similarity):
    temperature = 1.0 if similarity == "dot" else 0.1
    cfg = small(settings, patience=20, per_model={"sasrec": {"model": {"similarity": similarity}, "train": {
        "loss": loss, "lr": 5e-3, "batch_size": 32, "temperature": temperature, "n_random_negatives": 64}}})
    res = train.train_model(cfg, synth_dataset, "loo", "sasrec", epochs=4)
    assert res["stopped"] == "epochs" and np.isfinite(res["val"]["recall@200"])
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]  # it learns
    model, pcfg = load_checkpoint(res["run_dir"])
    assert pcfg.similarity == similarity
    m = harness.evaluate_run(cfg, synth_dataset, "loo", "sasrec", run_dir=res["run_dir"], write_report=False)
    assert m["all"]["recall@50"] > 50 / m["meta"]["items"]  # better than chance


def test_refit_on_everything_before_the_test_cut_off(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    cfg = small(settings, fit_splits="train_valid")
    res = train.train_model(cfg, synth_dataset, "temporal", "learn_hybrid", epochs=2, embeddings=emb)
    assert res["val"] is None and res["epochs_run"] == 2 and res["stopped"] == "epochs"
    split = splits.load_split(settings, synth_dataset, "temporal")
    vocab = pd.read_parquet(f"{res['run_dir']}/items.parquet")
    seen = set(split.loc[split[S.SPLIT].isin([S.TRAIN, S.VALID]), S.ITEM_ID])
    only_valid = seen - set(split.loc[split[S.SPLIT] == S.TRAIN, S.ITEM_ID])
    assert only_valid and ((vocab["item_idx"] > 0) == vocab[S.ITEM_ID].isin(seen)).all()


def test_dense_all_action_logq_shifts_only_relative_scores():
    g = torch.Generator().manual_seed(2)
    user = torch.nn.functional.normalize(torch.randn(3, 2, 4, generator=g), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(3, 2, 4, generator=g), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    ids, nid = torch.arange(6).view(3, 2), torch.arange(10, 15)
    ok = torch.ones(3, 2, dtype=torch.bool)
    base = dense_all_action_loss(user, ok, items, ids, ok, 0.3, neg, nid)
    const = dense_all_action_loss(user, ok, items, ids, ok, 0.3, neg, nid, torch.full((3, 2), 1.5), torch.full((5,), 1.5))
    assert const.item() == pytest.approx(base.item(), rel=1e-5)
    # penalising the random negatives' sampling probability less makes them stronger negatives
    harder = dense_all_action_loss(user, ok, items, ids, ok, 0.3, neg, nid, torch.zeros(3, 2), torch.full((5,), -2.0))
    assert harder.item() > base.item()


def test_kind_defaults_then_per_model_settings(settings):
    hybrid = kinds.resolve(settings, "learn_hybrid")
    assert hybrid.model.kind == "learn_hybrid" and hybrid.train.loss == "next_item"
    assert hybrid.model.id_dropout == kinds.kind_settings("learn_hybrid")["model"]["id_dropout"]
    assert kinds.resolve(settings, "learn").train.loss == "dense_all_action"  # the paper's loss
    mine = settings.with_overrides(train={"per_model": {"learn_hybrid": {"model": {"id_dropout": 0.9}},
                                                        "sasrec": {"train": {"lr": 0.02}}}})
    assert kinds.resolve(mine, "learn_hybrid").model.id_dropout == 0.9
    assert kinds.resolve(mine, "learn_hybrid").train.logq is hybrid.train.logq  # the rest stays
    assert kinds.resolve(mine, "sasrec").train.lr == 0.02
    with pytest.raises(ValueError, match="only 'model' and 'train'"):
        kinds.resolve(settings.with_overrides(train={"per_model": {"learn": {"serve": {}}}}), "learn")


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_kind_has_a_settings_file_with_model_and_train_sections(kind):
    path = MODEL_CONFIG_DIR / f"{kind}.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(raw) == {"model", "train"} and path.read_text(encoding="utf-8").startswith("#")  # a header says why
    loaded = kinds.kind_settings(kind)
    assert set(loaded) == {"model", "train"} and all(isinstance(v, dict) for v in loaded.values())
    with pytest.raises(ValueError):
        kinds.kind_settings("popular")  # baselines have no settings file


def test_resolve_gives_the_validated_learn_hybrid_settings(settings):
    c = kinds.resolve(settings, "learn_hybrid")
    assert (c.model.kind, c.model.id_dropout, c.model.mix_k) == ("learn_hybrid", 0.3, 10.0)
    assert (c.train.loss, c.train.lr, c.train.temperature, c.train.logq) == ("next_item", 3e-3, 0.1, False)
    sasrec = kinds.resolve(settings, "sasrec")
    assert (sasrec.model.block, sasrec.model.dropout, sasrec.train.loss, sasrec.train.length_buckets) == \
        ("sasrec", 0.5, "bce", False)


def test_sparse_update_trains_only_the_id_rows_of_items_with_new_evidence(settings, synth_dataset):
    emb = topic_embeddings(settings, synth_dataset)
    base = train.train_model(small(settings), synth_dataset, "temporal", "learn_hybrid", epochs=1, embeddings=emb)
    # The validation window's events become training evidence: the items they touch change, the rest do not.
    cfg = small(settings, fit_splits="train_valid")
    upd = train.train_model(cfg, synth_dataset, "temporal", "learn_hybrid", epochs=2, embeddings=emb,
                            warm_start=base["run_dir"], update="sparse")
    assert upd["update"] == "sparse" and upd["sparse_rows"] > 0 and upd["steps"] > 0
    a, _ = load_checkpoint(base["run_dir"])
    b, _ = load_checkpoint(upd["run_dir"])
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        if name not in ("item_id.weight", "id_count"):
            assert torch.equal(sa[name], sb[name]), name  # dense weights and the content centring are kept
    va = pd.read_parquet(Path(base["run_dir"]) / "items.parquet").set_index(S.ITEM_ID)
    vb = pd.read_parquet(Path(upd["run_dir"]) / "items.parquet").set_index(S.ITEM_ID)
    both = va.index[(va["item_idx"] > 0) & (vb.reindex(va.index)["item_idx"] > 0)]
    changed = vb.loc[both, S.POPULARITY].to_numpy() != va.loc[both, S.POPULARITY].to_numpy()
    assert changed.any() and (~changed).any()
    rows_a = sa["item_id.weight"][torch.as_tensor(va.loc[both, "item_idx"].to_numpy())]
    rows_b = sb["item_id.weight"][torch.as_tensor(vb.loc[both, "item_idx"].to_numpy())]
    same = (rows_a == rows_b).all(1).numpy()
    assert same[~changed].all() and not same[changed].all()
    # so the item tower gives every item without new evidence exactly its old vector
    ids, content = emb
    keep = np.isin(ids, both[~changed])
    ia = torch.as_tensor(va.reindex(ids)["item_idx"].fillna(0).to_numpy(np.int64))
    ib = torch.as_tensor(vb.reindex(ids)["item_idx"].fillna(0).to_numpy(np.int64))
    with torch.no_grad():
        xa = a.eval().encode_items(torch.as_tensor(content), ia).numpy()
        xb = b.eval().encode_items(torch.as_tensor(content), ib).numpy()
    assert np.abs(xa[keep] - xb[keep]).max() < 1e-5
    assert np.abs(xa[~keep] - xb[~keep]).max() > 1e-3
    with pytest.raises(ValueError, match="warm start"):
        train.train_model(cfg, synth_dataset, "temporal", "learn_hybrid", epochs=1, embeddings=emb, update="sparse")
    # a content-only model has no ID rows: its sparse update trains nothing and keeps every weight
    base_c = train.train_model(small(settings), synth_dataset, "temporal", "learn", epochs=1, embeddings=emb)
    upd_c = train.train_model(cfg, synth_dataset, "temporal", "learn", epochs=2, embeddings=emb,
                              warm_start=base_c["run_dir"], update="sparse")
    assert upd_c["steps"] == 0 and upd_c["sparse_rows"] == 0
    ca, cb = load_checkpoint(base_c["run_dir"])[0].state_dict(), load_checkpoint(upd_c["run_dir"])[0].state_dict()
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
