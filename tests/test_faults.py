"""Faults: a worker killed with SIGKILL in the middle of encoding, training or an index load.

Each case runs the real stage in a child process, lets it get part-way (the child announces the point on
stdout and waits there, so the kill lands at a known place in the work), kills it with ``kill -9``, then
checks what a reader sees and that the next run finishes the job: encoding resumes from the committed
parts, training leaves no partial run, the index alias never points at a half-loaded collection, and
nothing ends up twice.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learn_tasks import schema as S
from learn_tasks.config import load_settings

from helpers import free_port

pytestmark = pytest.mark.integration

N_ITEMS = 120
PART = 16  # encode.shard_items: items per committed part
SET = ["encode.shard_items=16", "train.val_users=50", "train.threads=1", "index.insert_batch=250",
       "index.index_type=FLAT", "index.recall_queries=32"]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "LEARN_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _cfg(home: Path):
    return load_settings(env={"LEARN_HOME": str(home)}, overrides=SET)


def kill_at(home: Path, code: str, marker: str, timeout: float = 300.0) -> str:
    """Run ``code`` in a child with LEARN_HOME=home; SIGKILL it once it prints a line starting with ``marker``."""
    prelude = f"import sys\nfrom learn_tasks.config import load_settings\ncfg = load_settings(overrides={SET!r})\n"
    proc = subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    seen = []
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break  # the child ended without reaching the marker
                seen.append(line)
                if line.startswith(marker):
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                    assert proc.returncode == -signal.SIGKILL
                    return line.strip()
        raise AssertionError(f"child never printed {marker!r}; rc={proc.poll()} out={''.join(seen)[-2000:]} "
                             f"err={proc.stderr.read()[-3000:] if proc.poll() is not None else ''}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from learn_tasks.data import datasets as data
    from learn_tasks.data import synth

    home = tmp_path_factory.mktemp("faults") / "learn_home"
    src = synth.write_seqrec(home.parent / "src", synth.SynthSpec(n_users=100, n_items=N_ITEMS, seed=7))
    data.prepare_dataset(_cfg(home), "seqrec", src, "synth")
    return home


# ==================================================================================================
# 1. Encoding: killed between committed parts, resumed without re-encoding or duplicating anything
# ==================================================================================================
@pytest.fixture(scope="module")
def encoded(home: Path) -> dict:
    """Kill the encoder after two committed parts, then run it again to completion."""
    from learn_tasks.ceg import encode, store

    line = kill_at(home, """
        import time
        from learn_tasks.ceg import encode
        def on_commit(part, n):
            print(f"COMMITTED {n}", flush=True)
            if n >= 2 * 16:
                time.sleep(600)  # killed here: more parts to go
        encode.encode_catalogue(cfg, "synth", on_commit=on_commit)
    """, "COMMITTED 32")
    cfg = _cfg(home)
    vdirs = [p for p in cfg.paths.embedding_store("synth").iterdir() if p.is_dir()]
    assert len(vdirs) == 1
    before = {"parts": store.list_parts(vdirs[0]), "current": store.current_fingerprint(cfg, "synth"),
              "killed_at": line}
    try:  # what a trainer would get now
        store.load_embeddings(cfg, "synth")
        before["readable"] = True
    except FileNotFoundError:
        before["readable"] = False
    resumed = encode.encode_catalogue(cfg, "synth")
    return {"cfg": cfg, "vdir": vdirs[0], "before": before, "resumed": resumed}


def test_encode_killed_mid_run_resumes_and_keeps_every_item_once(encoded: dict) -> None:
    from learn_tasks.data import datasets as data
    from learn_tasks.ceg import store

    cfg, before, resumed = encoded["cfg"], encoded["before"], encoded["resumed"]
    # While killed: two complete parts, and no CURRENT (an incomplete version is never served).
    assert len(before["parts"]) == 2 and before["current"] is None and not before["readable"]
    # The next run encodes only what is missing.
    assert resumed["skipped"] == 2 * PART and resumed["encoded"] == N_ITEMS - 2 * PART
    assert resumed["complete"] and resumed["current"]
    ids = pd.concat([pd.read_parquet(p, columns=[S.ITEM_ID]) for p in store.list_parts(encoded["vdir"])])[S.ITEM_ID]
    assert ids.is_unique and len(ids) == N_ITEMS  # nothing duplicated
    emb_ids, emb = store.load_embeddings(cfg, "synth")
    items = data.load_items(cfg, "synth")[S.ITEM_ID].to_numpy()
    assert np.array_equal(emb_ids, np.sort(items)) and np.isfinite(emb).all()
    assert not list(encoded["vdir"].glob("part-*.tmp*"))


# ==================================================================================================
# 2. Training: killed mid-epoch and while writing the checkpoint; no partial run is ever visible
# ==================================================================================================
def test_train_killed_leaves_no_partial_run_and_reruns_once(home: Path, encoded: dict) -> None:
    from learn_tasks.pch import registry
    from learn_tasks.training import train

    cfg = encoded["cfg"]
    models = registry.dataset_models(cfg, "synth")
    # a) mid-training, after the first epoch's log line
    kill_at(home, """
        import logging
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from learn_tasks.training import train
        train.train_model(cfg, "synth", model="learn", epochs=50)
    """, "epoch 1/50")
    assert registry.runs(cfg, "synth") == [] and registry.latest(cfg, "synth") is None
    # b) while the run folder is being written: the checkpoint is on disk under a temporary name
    kill_at(home, """
        import time
        from learn_tasks.training import train
        real = train.save_checkpoint
        def save_then_stop(*args, **kwargs):
            out = real(*args, **kwargs)
            print("CHECKPOINT WRITTEN", flush=True)
            time.sleep(600)  # killed here, before the folder is complete and renamed into place
            return out
        train.save_checkpoint = save_then_stop
        train.train_model(cfg, "synth", model="learn", epochs=1)
    """, "CHECKPOINT WRITTEN")
    leftovers = [p for p in models.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers and (leftovers[0] / "model.safetensors").exists()  # the kill really hit mid-write
    assert registry.runs(cfg, "synth") == [] and registry.promoted(cfg, "synth") is None
    # The next run completes exactly one run, which is the latest and can be promoted and loaded.
    result = train.train_model(cfg, "synth", model="learn", epochs=1)
    runs = registry.runs(cfg, "synth")
    assert [str(p) for p in runs] == [result["run_dir"]]
    registry.promote(cfg, "synth", runs[0])
    from learn_tasks.pch.model import load_checkpoint

    load_checkpoint(registry.promoted(cfg, "synth"))


# ==================================================================================================
# 3. Index load: killed half-way through inserting a new version; the alias keeps the old one
# ==================================================================================================
def _rows(seed: int, n: int = 2000):
    from learn_tasks.online import index

    v = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return index.ItemRows(item_ids=np.arange(1000, 1000 + n, dtype=np.int64), vectors=v)


def test_index_load_killed_never_exposes_a_half_loaded_collection(home: Path) -> None:
    from learn_tasks.online import index
    from learn_tasks.online import milvus_server

    cfg = _cfg(home)
    milvus_server.start(cfg, port=free_port())  # a server shared by processes, as Milvus is in production
    try:
        client = index.connect(cfg)
        assert index.resolve_uri(cfg)[2] == "lite-server"
        v1 = index.build(cfg, "faults", "v1", _rows(1))
        alias = index.alias_name(cfg, "faults")
        assert index.current(cfg, "faults", client) == v1["collection"]

        kill_at(home, """
            import time
            import numpy as np
            from learn_tasks.online import index
            client = index.connect(cfg)
            real, calls = client.insert, []
            def insert_then_stop(*args, **kwargs):
                out = real(*args, **kwargs)
                calls.append(1)
                if len(calls) == 3:
                    print("INSERTED 3 BATCHES", flush=True)
                    time.sleep(600)  # killed here: 3 of 8 batches in, not flushed, not indexed
                return out
            client.insert = insert_then_stop
            v = np.random.default_rng(2).standard_normal((2000, 32)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            rows = index.ItemRows(item_ids=np.arange(1000, 3000, dtype=np.int64), vectors=v)
            index.build(cfg, "faults", "v2", rows, client=client)
        """, "INSERTED 3 BATCHES")

        # The reader's view right after the kill: the alias still serves v1, complete, with every row.
        v2_name = index.collection_name("faults", "v2")
        assert index.current(cfg, "faults", client) == v1["collection"]
        by_name = {v["collection"]: v for v in index.versions(cfg, "faults", client)}
        assert by_name[v1["collection"]]["complete"] and not by_name[v2_name]["complete"]
        served = index.fetch_all(client, alias)
        assert len(served) == 2000 and np.allclose(served.vectors, _rows(1).vectors, atol=1e-6)
        with pytest.raises(milvus_server.IndexStoreError):
            index.rollback(cfg, "faults", to="v2", client=client)  # an incomplete version is no target

        # The next load drops the half-loaded collection, rebuilds it, and only then moves the alias.
        v2 = index.build(cfg, "faults", "v2", _rows(2), client=client)
        assert not v2["reused"] and v2["previous"] == v1["collection"]
        assert index.current(cfg, "faults", client) == v2_name
        served = index.fetch_all(client, alias)
        assert len(served) == 2000 and np.unique(served.item_ids).size == 2000  # nothing duplicated
        assert np.allclose(served.vectors, _rows(2).vectors, atol=1e-6)
        # Rolling back is still possible: v1 was kept whole.
        assert index.rollback(cfg, "faults", client=client)["to"] == v1["collection"]
        index.close(cfg)
    finally:
        milvus_server.stop(cfg)


# ==================================================================================================
# Recovery: a bad model went live; `learn rollback` serves the previous one again
# ==================================================================================================
def test_rollback_command_moves_alias_and_model_together(home: Path, encoded: dict) -> None:
    from typer.testing import CliRunner

    from learn_tasks.online import index
    from learn_tasks.pch import registry
    from learn_tasks.training import train
    from learn_tasks.cli import app

    cfg = encoded["cfg"].with_overrides(index={"index_type": "FLAT"})
    try:
        good = Path(train.train_model(cfg, "synth", model="learn", epochs=1)["run_dir"])
        registry.promote(cfg, "synth", good)
        index.index_catalogue(cfg, "synth")
        bad = Path(train.train_model(cfg, "synth", model="learn", epochs=1)["run_dir"])
        registry.promote(cfg, "synth", bad)
        index.index_catalogue(cfg, "synth")
        assert index.current(cfg, "synth") == index.collection_name("synth", bad.name)
        index.close(cfg)  # the command opens Milvus Lite itself
        res = CliRunner().invoke(app, ["--set", "index.index_type=FLAT", "rollback", "--dataset", "synth", "--json"],
                                 env={"LEARN_HOME": str(home)})
        assert res.exit_code == 0, res.output
        assert registry.promoted(cfg, "synth") == good
        # What the service checks at start-up: the promoted model and the alias's collection agree.
        assert index.current(cfg, "synth") == index.collection_name("synth", good.name)
        assert {v["collection"] for v in index.versions(cfg, "synth")} >= {
            index.collection_name("synth", good.name), index.collection_name("synth", bad.name)}
    finally:
        index.close(cfg)
