"""LEARN_HOME on an object store: an S3-compatible server (moto's, from PyPI) started here.

Each "host" is its own working directory (``storage.cache_dir``) with the same ``s3://`` home, as
Airflow workers on several machines would be: what one host publishes, another (starting empty) lists,
fetches and reads, byte for byte. A local LEARN_HOME is covered by every other test file unchanged.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import free_port
from learn_tasks import artifact_log, artifacts
from learn_tasks.ceg import encode, store
from learn_tasks.config import Settings, load_settings
from learn_tasks.data import datasets as data
from learn_tasks.data import synth
from learn_tasks.monitoring import dashboard
from learn_tasks.pch import registry
from learn_tasks.pch.model import PCHConfig, build_model, load_checkpoint, save_checkpoint
from learn_tasks.storage import atomic_dir, write_json

pytestmark = pytest.mark.production
moto_server = pytest.importorskip("moto.server", reason="moto[s3] (dev extra) runs the S3-compatible server")
s3fs = pytest.importorskip("s3fs", reason="s3fs reads and writes s3:// homes")


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_home(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; credentials through the environment, as in production."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "learn-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "learn-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket = f"learn-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/home"


def host(home: str, workdir: Path, endpoint: str, **env: str) -> Settings:
    return load_settings(env={"LEARN_HOME": home, "LEARN_STORAGE__CACHE_DIR": str(workdir),
                              "LEARN_STORAGE__ENDPOINT_URL": endpoint, **env})


@pytest.fixture
def hosts(s3_home: str, s3_endpoint: str, tmp_path: Path) -> tuple[Settings, Settings]:
    return host(s3_home, tmp_path / "host_a", s3_endpoint), host(s3_home, tmp_path / "host_b", s3_endpoint)


def write_run(cfg: Settings, dataset: str, kind: str = "learn_hybrid", seed: int = 0) -> Path:
    """A complete run folder (random weights) built and published as training does."""
    torch.manual_seed(seed)
    pcfg = PCHConfig(kind=kind, d_in=8, d_model=16, n_layers=1, n_heads=2, n_items=20, out_dim=16, max_len=10)
    run_dir = registry.new_run_dir(cfg, dataset, kind)
    with atomic_dir(run_dir) as tmp:
        save_checkpoint(build_model(pcfg), pcfg, tmp)
        write_json({"kind": kind, "protocol": "loo", "dataset": dataset,
                    "created": datetime.now(timezone.utc).isoformat()}, tmp / registry.META)
    registry.publish_run(cfg, run_dir)
    return run_dir


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_checkpoint(a)[0].state_dict(), load_checkpoint(b)[0].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ==================================================================================================
# Model runs
# ==================================================================================================
def test_settings_of_a_url_home() -> None:
    cfg = load_settings(env={"LEARN_HOME": "s3://bucket/prefix/"})
    assert cfg.remote_home == "s3://bucket/prefix" and cfg.paths.home.is_absolute()
    assert cfg.paths.home.parent.name == "learn" and cfg.paths.models() == cfg.paths.home / "models"
    other = load_settings(env={"LEARN_HOME": "s3://bucket/other"})
    assert other.paths.home != cfg.paths.home  # one working directory per URL
    local = load_settings(env={"LEARN_HOME": "rel/home"})
    assert local.remote_home is None and local.paths.home == Path("rel/home")  # unchanged, not resolved
    assert artifacts.remote(local) is None and artifacts.publish(local, Path("rel/home")) is None


def test_a_run_written_on_one_host_is_listed_and_loaded_on_another(hosts) -> None:
    a, b = hosts
    run = write_run(a, "synth")
    other = write_run(a, "synth", kind="learn", seed=1)
    assert not b.paths.dataset_models("synth").exists()  # host B starts empty

    listed = registry.runs(b, "synth")
    assert [p.name for p in listed] == [run.name, other.name]  # oldest first
    assert all(p.parent == b.paths.dataset_models("synth") for p in listed)
    got = registry.latest(b, "synth", kind="learn_hybrid", protocol="loo")
    assert got == b.paths.dataset_models("synth") / run.name and same_weights(run, got)
    assert (got / "config.json").read_bytes() == (run / "config.json").read_bytes()
    assert registry.latest(b, "synth", kind="sasrec") is None and registry.latest(b, "synth", protocol="temporal") is None
    assert registry.runs(b, "other_dataset") == []

    # A file added to a published run (the evaluation's metrics.json) reaches the other host's copy.
    write_json({"all": {"recall@10": 0.5}}, run / "metrics.json")
    registry.publish_run(a, run)
    again = registry.find_run(b, "synth", run.name)
    assert json.loads((again / "metrics.json").read_text())["all"]["recall@10"] == 0.5
    assert registry.find_run(b, "synth", "no-such-run") is None and registry.find_run(b, "synth", "../x") is None


def test_a_half_published_run_is_invisible(hosts) -> None:
    a, b = hosts
    run = write_run(a, "synth")
    r = artifacts.remote(a)
    r.fs.rm_file(f"{r.key(run)}/{artifacts.MANIFEST}")  # every file uploaded, the commit never written
    r.fs.invalidate_cache()
    assert r.fs.find(f"{r.key(run)}/{artifacts.OBJECTS}")  # the objects are there
    assert registry.runs(b, "synth") == [] and registry.latest(b, "synth") is None
    assert registry.find_run(b, "synth", run.name) is None
    assert not (b.paths.dataset_models("synth") / run.name).exists()


def test_republishing_is_idempotent_and_a_changed_file_replaces_its_object(hosts) -> None:
    a, b = hosts
    run = write_run(a, "synth")
    r = artifacts.remote(a)
    key = f"{r.key(run)}/{artifacts.MANIFEST}"
    first, etag, objects = r.fs.cat_file(key), r.fs.info(key)["ETag"], set(r.fs.find(f"{r.key(run)}/_objects"))
    registry.publish_run(a, run)
    r.fs.invalidate_cache()
    assert r.fs.cat_file(key) == first and r.fs.info(key)["ETag"] == etag
    assert set(r.fs.find(f"{r.key(run)}/_objects")) == objects

    old = artifacts.file_entry(run / registry.META)["sha256"]
    write_json({**json.loads((run / registry.META).read_text()), "note": "edited"}, run / registry.META)
    registry.publish_run(a, run)
    r.fs.invalidate_cache()
    now = set(r.fs.find(f"{r.key(run)}/_objects"))
    assert len(now) == len(objects) and not any(k.endswith(old) for k in now)  # the stale object went
    assert json.loads((registry.find_run(b, "synth", run.name) / registry.META).read_text())["note"] == "edited"


def test_a_corrupted_object_is_refused_naming_the_file(hosts) -> None:
    a, b = hosts
    run = write_run(a, "synth")
    r = artifacts.remote(a)
    weights = artifacts.file_entry(run / "model.safetensors")
    r.fs.pipe_file(f"{r.key(run)}/_objects/{weights['sha256']}", b"not the weights")
    with pytest.raises(artifacts.ArtifactError, match="model.safetensors"):
        registry.find_run(b, "synth", run.name)
    assert not (b.paths.dataset_models("synth") / run.name).exists()  # nothing half-fetched in place


# ==================================================================================================
# Embedding stores
# ==================================================================================================
def part(cfg: Settings, fp: str, ids: list[int], tag: str, value: float) -> Path:
    vdir = store.store_dir(cfg, "synth", fp)
    emb = np.full((len(ids), 4), value, dtype=np.float32) + np.arange(len(ids), dtype=np.float32)[:, None]
    return store.write_part(vdir, np.asarray(ids), [f"h{i}" for i in ids], emb, tag)


def n_commits(cfg: Settings, fp: str) -> int:
    r = artifacts.remote(cfg)
    base = f"{r.key(store.store_dir(cfg, 'synth', fp))}/{artifacts.COMMITS}"
    r.fs.invalidate_cache(base)
    return len(r.fs.find(base))


def test_shards_on_two_hosts_compaction_and_current(hosts) -> None:
    a, b = hosts
    fp = "enc-test"
    for cfg in (a, b):  # two encode shards, each starting from the published version
        store.fetch_version(cfg, "synth", fp)
        write_json({"dim": 4, "dataset": "synth"}, store.store_dir(cfg, "synth", fp) / "manifest.json")
    part(a, fp, [1, 2, 3], "s0of2", 1.0)
    part(b, fp, [4, 5, 6], "s1of2", 2.0)
    store.publish_version(a, "synth", fp)
    store.publish_version(b, "synth", fp)  # concurrent publishers: both commits land
    assert n_commits(a, fp) == 2

    ids_a, emb_a = store.load_embeddings(a, "synth", fp)  # fetches B's part
    ids_b, emb_b = store.load_embeddings(b, "synth", fp)
    assert ids_a.tolist() == ids_b.tolist() == [1, 2, 3, 4, 5, 6] and np.array_equal(emb_a, emb_b)

    # A local part nobody published is not seen elsewhere.
    part(a, fp, [7], "s0of2", 3.0)
    assert 7 not in store.load_embeddings(b, "synth", fp)[0]

    # Compaction on A drops item 6 (gone from the catalogue) and item 7; B follows, including the
    # rewritten part B itself wrote.
    live = pd.DataFrame({"item_id": [1, 2, 3, 4, 5]})
    assert store.compact(store.store_dir(a, "synth", fp), live) == 2
    store.publish_version(a, "synth", fp)
    ids_b, emb_b = store.load_embeddings(b, "synth", fp)
    ids_a, emb_a = store.load_embeddings(a, "synth", fp)
    assert ids_b.tolist() == [1, 2, 3, 4, 5] and np.array_equal(emb_a, emb_b)
    assert len(store.list_parts(store.store_dir(b, "synth", fp))) == 2

    assert store.current_fingerprint(b, "synth") is None
    store.set_current_fingerprint(a, "synth", fp)
    assert store.current_fingerprint(b, "synth") == fp and store.has_version(b, "synth", fp)
    assert not store.has_version(b, "synth", "never-encoded")

    before = n_commits(a, fp)  # nothing changed: publishing again writes nothing
    assert artifact_log.publish_log(a, store.store_dir(a, "synth", fp)) is None
    store.publish_version(b, "synth", fp)
    assert n_commits(a, fp) == before


def test_a_long_log_is_folded_into_a_snapshot(hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = hosts
    monkeypatch.setattr(artifact_log, "SNAPSHOT_AFTER", 3)
    fp = "enc-snap"
    write_json({"dim": 4}, store.store_dir(a, "synth", fp) / "manifest.json")
    for k in range(5):
        part(a, fp, [10 + k], "all", float(k))
        store.publish_version(a, "synth", fp)
    assert n_commits(a, fp) <= 4  # folded (the snapshot record plus at most the latest commits)
    ids, emb = store.load_embeddings(b, "synth", fp)
    assert ids.tolist() == [10, 11, 12, 13, 14] and np.array_equal(emb, store.load_embeddings(a, "synth", fp)[1])


def test_an_encoded_store_is_read_on_another_host(hosts, tmp_path: Path) -> None:
    a, b = hosts
    src = synth.write_seqrec(tmp_path / "src", synth.SynthSpec(n_users=40, n_items=60))
    data.prepare_dataset(a, "seqrec", src, "synth")
    res = encode.encode_catalogue(a, "synth")
    assert res["complete"] and res["encoded"] == res["total"] - res["quarantined"]

    assert not b.paths.dataset("synth").exists()  # B has no dataset, only the published store
    assert store.current_fingerprint(b, "synth") == res["fingerprint"]
    ids_a, emb_a = store.load_embeddings(a, "synth")
    ids_b, emb_b = store.load_embeddings(b, "synth")
    assert np.array_equal(ids_a, ids_b) and np.array_equal(emb_a, emb_b) and len(ids_b) == res["encoded"]
    assert len(store.load_quarantine(b, "synth")) == len(store.load_quarantine(a, "synth"))

    commits = n_commits(a, res["fingerprint"])
    again = encode.encode_catalogue(a, "synth")  # nothing to encode: nothing is published
    assert again["encoded"] == 0 and again["current"] and n_commits(a, res["fingerprint"]) == commits


# ==================================================================================================
# Reports
# ==================================================================================================
def test_reports_and_the_monitoring_history_reach_another_host(hosts) -> None:
    a, b = hosts
    out = a.paths.eval_reports("synth") / "run1-test"
    out.mkdir(parents=True)
    write_json({"meta": {"stage": "test", "model": "learn"}, "all": {"recall@10": 0.25}}, out / "metrics.json")
    (out / "report.md").write_text("# report\n", encoding="utf-8")
    artifacts.publish(a, out)
    (a.paths.eval_reports("synth") / "unpublished-test").mkdir()  # local only: not listed elsewhere

    got = artifacts.fetch_children(b, b.paths.eval_reports("synth"))
    assert [p.name for p in got] == ["run1-test"]
    assert (got[0] / "report.md").read_text() == "# report\n"
    assert artifacts.location(b, got[0]).startswith("s3://") and artifacts.location(b, got[0]).endswith(
        "/reports/eval/synth/run1-test")

    history = {"runs": {"r1": {"created": "2026-01-01", "values": {"all.recall@10": 0.25}}}}
    write_json(history, dashboard.history_path(a, "synth"))
    artifacts.publish_file(a, dashboard.history_path(a, "synth"))
    assert dashboard.load_history(b, "synth") == history


def test_check_writes_reads_and_removes_a_probe(hosts, s3_endpoint: str, tmp_path: Path) -> None:
    a, _ = hosts
    res = artifacts.check(a)
    assert res["home"] == a.remote_home and res["remote"] == "S3FileSystem"
    r = artifacts.remote(a)
    r.fs.invalidate_cache()
    assert not [k for k in r.fs.find(r.root) if ".learn-probe" in k]

    fresh = host(f"s3://learn-new-{uuid.uuid4().hex[:8]}/home", tmp_path / "c", s3_endpoint)
    with pytest.raises(artifacts.ArtifactError, match="cannot write, read and remove"):
        artifacts.check(fresh)  # no bucket
    assert artifacts.check(fresh, create_bucket=True)["home"] == fresh.remote_home
    unreachable = host("s3://any/home", tmp_path / "d", f"http://127.0.0.1:{free_port()}",  # fsspec options:
                       LEARN_STORAGE__OPTIONS="{config_kwargs: {retries: {max_attempts: 1}}}")  # fail fast
    with pytest.raises(artifacts.ArtifactError, match="EndpointConnectionError"):
        artifacts.check(unreachable)


# ==================================================================================================
# The CLI on an s3:// home
# ==================================================================================================
@pytest.mark.integration
def test_cli_encode_train_evaluate_on_one_host_read_on_another(hosts, s3_home: str, s3_endpoint: str,
                                                               tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from learn_tasks.cli import app

    a, b = hosts
    env = {"LEARN_HOME": s3_home, "LEARN_STORAGE__CACHE_DIR": str(a.paths.home),
           "LEARN_STORAGE__ENDPOINT_URL": s3_endpoint}
    runner = CliRunner()
    tiny = ["--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "train.batch_size=32",
            "--set", "train.n_random_negatives=32", "--set", "train.val_users=20", "--set", "train.threads=1"]
    src = synth.write_seqrec(tmp_path / "src", synth.SynthSpec(n_users=60, n_items=80))
    for args in (["data", "prepare", "--format", "seqrec", "--input", str(src), "--name", "synth"],
                 ["encode", "--dataset", "synth", "--json"],
                 tiny + ["train", "--dataset", "synth", "--model", "learn", "--epochs", "1", "--json"],
                 ["evaluate", "--dataset", "synth", "--model", "learn", "--max-users", "30", "--json"]):
        res = runner.invoke(app, args, env=env)
        assert res.exit_code == 0, f"learn {' '.join(args)}: {res.output}"

    run_a = registry.latest(a, "synth", kind="learn")
    run_b = registry.latest(b, "synth", kind="learn")  # host B: nothing local, everything fetched
    assert run_b is not None and run_b.name == run_a.name and same_weights(run_a, run_b)
    assert json.loads((run_b / "metrics.json").read_text()) == json.loads((run_a / "metrics.json").read_text())
    reports = artifacts.fetch_children(b, b.paths.eval_reports("synth"))
    assert [p.name for p in reports] == [f"{run_a.name}-test"]
    assert (reports[0] / "report.md").read_text() == (a.paths.eval_reports("synth") / reports[0].name /
                                                      "report.md").read_text()
    ids_a, emb_a = store.load_embeddings(a, "synth")
    ids_b, emb_b = store.load_embeddings(b, "synth")
    assert np.array_equal(ids_a, ids_b) and np.array_equal(emb_a, emb_b)


@pytest.mark.integration
def test_learn_pipeline_on_an_s3_home_publishes_what_another_host_reads(hosts, s3_home: str, s3_endpoint: str,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """learn_pipeline through Airflow's runner on host A; host B, empty, finds its run, embeddings and
    every report in the bucket."""
    from learn_tasks.orchestration import airflow_env, runner

    a, b = hosts
    for key, value in {"LEARN_HOME": s3_home, "LEARN_STORAGE__CACHE_DIR": str(a.paths.home),
                       "LEARN_STORAGE__ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)  # the tasks read their settings from the environment
    src = synth.write_seqrec(tmp_path / "src", synth.SynthSpec(n_users=80, n_items=100))
    data.prepare_dataset(a, "seqrec", src, "synth")
    airflow_home = tmp_path / "airflow"
    airflow_env.configure_airflow(airflow_home)
    res = runner.run_pipeline(a, dataset="synth", mode="full", day="2021-01-01", epochs=1, budget_s=30,
                              airflow_home=airflow_home)
    assert res["ok"], (res.get("failures"), res["tasks"])

    run_b = registry.latest(b, "synth")
    assert run_b is not None and run_b.name == Path(res["training"]["run_dir"]).name
    assert same_weights(Path(res["training"]["run_dir"]), run_b) and (run_b / "metrics.json").exists()
    assert store.current_fingerprint(b, "synth") == res["encoding"]["fingerprint"]
    assert len(store.load_embeddings(b, "synth")[0]) == res["encoding"]["encoded"]
    for kind in ("eval", "validation", "monitoring", "pipeline"):
        r = artifacts.remote(b)
        base = r.key(b.paths.reports(kind))
        r.fs.invalidate_cache(base)
        assert [k for k in r.fs.find(base) if k.endswith(artifacts.MANIFEST)], f"no {kind} report published"
    assert artifacts.fetch_children(b, b.paths.eval_reports("synth"))
    assert dashboard.load_history(b, "synth")["runs"]
