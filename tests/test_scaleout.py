"""Scale-out paths that run here: CEG shards as parallel worker processes (the Airflow mapped encode
tasks), and data-parallel PCH training under torch.distributed (gloo on CPU) launched with torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from learn_tasks.training import distributed as D
from learn_tasks import schema as S
from learn_tasks.config import load_settings

N_SHARDS = 2
TRAIN_SET = ["train.epochs=3", "train.n_random_negatives=256", "train.val_users=100", "train.patience=100",
             "train.warmup_steps=4", "train.threads=1", "model.dropout=0.0"]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "LEARN_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# ==================================================================================================
# Pure pieces of the data-parallel hooks (single process: no-ops; the partition rule itself)
# ==================================================================================================
def test_hooks_are_no_ops_in_one_process() -> None:
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0 and D.is_main()
    rng = np.random.default_rng(0)
    assert list(D.shard_batches(iter([1, 2, 3]), rng)) == [1, 2, 3]
    assert D.any_across(True) and not D.any_across(False)
    assert D.mean_across(2.5) == 2.5 and D.broadcast_str("x") == "x"
    m = torch.nn.Linear(2, 2)
    m(torch.ones(1, 2)).sum().backward()
    g = m.weight.grad.clone()
    D.average_gradients(m)
    assert torch.equal(m.weight.grad, g)


def _hook_worker(rank: int, world: int, init_file: str, queue) -> None:
    torch.set_num_threads(1)
    D.init("gloo", init_method=f"file://{init_file}", rank_=rank, world_size_=world)
    try:
        # Ranks start from different weights and random streams; broadcast/sync make them rank 0's.
        torch.manual_seed(100 + rank)
        model = torch.nn.Linear(3, 2)
        D.broadcast_module(model)
        rng = np.random.default_rng(rank)
        batches = ((int(i), rng.random()) for i in range(7))  # lazy: drawn after the stream is synced
        mine = list(D.shard_batches(batches, rng))
        # Each rank's gradient on its own batch; after averaging every rank holds the mean.
        x = torch.full((1, 3), float(rank + 1))
        model(x).sum().backward()
        D.average_gradients(model)
        flags = (D.any_across(rank == 1), D.any_across(False), D.mean_across(float(rank)))
        queue.put((rank, [b[0] for b in mine], [b[1] for b in mine], model.weight.detach().tolist(),
                   model.weight.grad.tolist(), flags, D.broadcast_str(f"run-of-rank-{rank}")))
    finally:
        D.shutdown()


@pytest.mark.integration
def test_data_parallel_hooks_across_two_gloo_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hook_worker, args=(r, 2, str(tmp_path / "rdzv"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (ids0, draws0, w0, g0, flags0, name0), (ids1, draws1, w1, g1, flags1, name1) = out[0], out[1]
    # 7 batches over 2 ranks: 0,2,4,6 | 1,3,5 + wrap-around 0 -> equal step counts, every batch used.
    assert ids0 == [0, 2, 4, 6] and ids1 == [1, 3, 5, 0]
    # Both ranks drew the batch list from rank 0's synchronised stream.
    assert draws0[0] == draws1[-1]
    assert w0 == w1  # rank 0's initial weights everywhere
    # d(sum(Wx+b))/dW = x per output row; x = 1 on rank 0, 2 on rank 1 -> the mean is 1.5 everywhere.
    assert g0 == g1 == [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5]]
    assert flags0 == flags1 == (True, False, 0.5)
    assert name0 == name1 == "run-of-rank-0"


# ==================================================================================================
# Real runs: sharded encoding in parallel processes, then torchrun training on the result
# ==================================================================================================
@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A generated dataset, its encode shards planned by the pipeline and encoded by N concurrent processes."""
    from learn_tasks.data import datasets as data
    from learn_tasks.orchestration import runs, stages
    from learn_tasks.data import synth

    home = tmp_path_factory.mktemp("scaleout") / "learn_home"
    cfg = load_settings(env={"LEARN_HOME": str(home)},
                        overrides=["encode.shard_items=16", f"pipeline.encode_shards={N_SHARDS}"])
    src = synth.write_seqrec(home.parent / "src", synth.SynthSpec(n_users=160, n_items=200))
    data.prepare_dataset(cfg, "seqrec", src, "synth")
    run = runs.RunArgs.from_params(cfg, {"dataset": "synth"}, None, None)
    shards = stages.plan_encode_shards(cfg, run)
    learn = [sys.executable, "-m", "learn_tasks.cli", "--set", "encode.shard_items=16"]
    procs = [subprocess.Popen([*learn, "encode", "--dataset", "synth", "--shard", f"{i}/{n}", "--json"],
                              env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, n in shards]  # like Airflow workers: separate processes, at the same time
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {"home": home, "cfg": cfg, "shards": shards, "results": results}


@pytest.mark.integration
def test_encode_shards_cover_every_item_exactly_once(sharded: dict) -> None:
    from learn_tasks.data import datasets as data
    from learn_tasks.ceg import encode, store

    cfg, results = sharded["cfg"], sharded["results"]
    assert sharded["shards"] == [[i, N_SHARDS] for i in range(N_SHARDS)]
    items = data.load_items(cfg, "synth")[S.ITEM_ID].to_numpy()
    assert sum(r["total"] for r in results) == len(items)
    assert sum(r["encoded"] for r in results) == len(items) and all(r["skipped"] == 0 for r in results)
    assert len({r["fingerprint"] for r in results}) == 1
    # Every committed part holds items of one shard, and every item sits in exactly one part.
    vdir = Path(results[0]["store"])
    seen = pd.concat([pd.read_parquet(p, columns=[S.ITEM_ID]).assign(part=p.name) for p in store.list_parts(vdir)])
    counts = seen[S.ITEM_ID].value_counts()
    assert set(counts.index) == set(items.tolist()) and counts.max() == 1
    owner = store.shard_of(seen[S.ITEM_ID].to_numpy(), N_SHARDS)
    assert seen.assign(owner=owner).groupby("part")["owner"].nunique().max() == 1
    # The version is complete and current; every item has one embedding.
    assert store.current_fingerprint(cfg, "synth") == results[0]["fingerprint"]
    ids, emb = store.load_embeddings(cfg, "synth")
    assert np.array_equal(ids, np.sort(items)) and emb.shape[0] == len(items) and np.isfinite(emb).all()
    # Running the shards again encodes nothing.
    again = encode.encode_catalogue(cfg, "synth")
    assert again["encoded"] == 0 and again["skipped"] == len(items) and again["complete"]


def _losses(run_dir: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_torchrun_two_gloo_processes_match_a_single_process_run(sharded: dict) -> None:
    """Same effective batch (2 ranks x 32 = 64), same steps: the loss curves agree within tolerance."""
    from learn_tasks.pch import registry
    from learn_tasks.training import train

    home = sharded["home"]
    torch.set_num_threads(1)
    base = load_settings(env={"LEARN_HOME": str(home)}, overrides=[*TRAIN_SET, "train.batch_size=64"])
    single = train.train_model(base, "synth", model="learn")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "learn_tasks.training.launch", "--dataset", "synth", "--model", "learn", "--backend", "gloo"]
    for item in [*TRAIN_SET, "train.batch_size=32"]:
        cmd += ["--set", item]
    done = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp = json.loads(done.stdout.strip().splitlines()[-1])
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    # One run folder from the two processes (rank 0 wrote it), complete and loadable.
    runs = registry.runs(base, "synth")
    assert {p.name for p in runs} == {Path(single["run_dir"]).name, ddp["run_id"]}
    assert (Path(ddp["run_dir"]) / "model.safetensors").exists()
    assert ddp["steps"] == single["steps"]  # half the batches per rank, twice the batch per step
    s, d = _losses(single["run_dir"]), _losses(ddp["run_dir"])
    print("single-process losses", s, "\ntorchrun x2 losses", d)
    assert len(s) == len(d) == 3
    assert d[-1] < d[0] and s[-1] < s[0]  # both learn
    # Per-rank in-batch negatives are half as many, so DDP's contrastive loss sits a little lower.
    assert abs(d[-1] - s[-1]) / s[-1] < 0.15, (s, d)
    assert abs(ddp["val"]["recall@200"] - single["val"]["recall@200"]) < 0.15, (ddp["val"], single["val"])
