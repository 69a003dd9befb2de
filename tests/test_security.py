"""Security: write endpoints need the token, no unsafe deserialisation or eval on data paths, secrets only
from the environment, and generated (never default) passwords for the production stack."""
from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import stat
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import yaml

from learn_tasks.config import REPO_ROOT, load_settings

TOKEN = "s3cret-token-for-tests"
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
WELL_KNOWN = {"", "airflow", "admin", "password", "postgres", "minioadmin", "milvus", "changeme", "secret",
              "redis", "feast", "root", "test"}


def _gen_env():
    spec = importlib.util.spec_from_file_location("gen_env", REPO_ROOT / "docker" / "gen_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ==================================================================================================
# Write endpoints
# ==================================================================================================
class _Unreachable:
    """Stands in for the recommender: any use means a write got past the token check."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the recommender was reached ({name}) without a valid token")

    def close(self) -> None:
        """Shutting the app down releases the recommender; that is not a request reaching it."""


@pytest.fixture
def app_client(settings, monkeypatch: pytest.MonkeyPatch):
    from fastapi.testclient import TestClient

    from learn_tasks.online import service as serve

    monkeypatch.setenv(settings.serve.token_env, TOKEN)
    # The token check runs before the request reaches the recommender; _Unreachable proves it never does.
    app = serve.create_app(settings, "synth", recommender=_Unreachable())
    with TestClient(app, raise_server_exceptions=True) as client:
        yield app, client


def _write_routes(app) -> list[tuple[str, str]]:
    from fastapi.routing import APIRoute

    return [(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in sorted(r.methods & WRITE_METHODS)]


def test_every_write_endpoint_refuses_a_missing_or_wrong_token(app_client) -> None:
    app, client = app_client
    routes = _write_routes(app)
    assert {p for _, p in routes} >= {"/items", "/events"}
    for method, path in routes:
        url = re.sub(r"\{[^}]+\}", "1", path)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
            res = client.request(method, url, json={}, headers=headers)
            assert res.status_code == 401, (method, path, headers, res.status_code, res.text)
            assert res.headers.get("www-authenticate") == "Bearer"
        # The right token passes the gate (the empty body then fails validation, before any work).
        res = client.request(method, url, json={}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert res.status_code == 422, (method, path, res.status_code, res.text)


def test_without_a_configured_token_writes_are_disabled(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from learn_tasks.online import service as serve

    monkeypatch.delenv(settings.serve.token_env, raising=False)
    app = serve.create_app(settings, "synth", recommender=_Unreachable())
    with TestClient(app) as client:
        for method, path in _write_routes(app):
            res = client.request(method, re.sub(r"\{[^}]+\}", "1", path), json={},
                                 headers={"Authorization": "Bearer anything"})
            assert res.status_code == 503, (method, path, res.status_code)


# ==================================================================================================
# No unsafe deserialisation, eval or exec on data paths
# ==================================================================================================
CODE_DIRS = ("learn_tasks", "dags", "feature_repo", "bench")
FORBIDDEN = [
    (r"\bimport\s+(c?pickle|dill|shelve|marshal)\b|\bfrom\s+(c?pickle|dill|shelve|marshal)\b", "pickle-like module"),
    (r"\bpickle\s*\.", "pickle"),
    (r"\bread_pickle\s*\(|\bto_pickle\s*\(", "pandas pickle"),
    (r"\bjoblib\s*\.\s*load\s*\(", "joblib.load (pickle)"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle=True"),
    (r"weights_only\s*=\s*False", "torch.load(weights_only=False)"),
    (r"(?<![\w.])eval\s*\(", "eval"),
    (r"(?<![\w.])exec\s*\(", "exec"),
    (r"\byaml\s*\.\s*(load|load_all|unsafe_load|full_load)\s*\(", "yaml.load without safe_load"),
    (r"\b(Unsafe|Full)?Loader\s*=\s*yaml\s*\.\s*(Unsafe|Full)?Loader\b", "unsafe YAML loader"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code=True hard-coded"),
]


def _code_only(path: Path) -> str:
    """The file's code with comments and string literals blanked (docstrings may say 'pickle')."""
    text = path.read_text(encoding="utf-8")
    lines = [list(line) for line in text.splitlines(keepends=True)]
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            row = lines[r - 1]
            lo = c0 if r == r0 else 0
            hi = c1 if r == r1 else len(row)
            for c in range(lo, hi):
                if row[c] != "\n":
                    row[c] = " "
    return "".join("".join(row) for row in lines)


def _python_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO_ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_grep_finds_what_it_must() -> None:
    """The scanner itself: each forbidden form is caught in code, and ignored in comments and strings."""
    import tempfile

    samples = ["import pickle", "x = pickle.loads(b)", "df = pd.read_pickle(p)", "a = np.load(p, allow_pickle=True)",
               "t = torch.load(p, weights_only=False)", "v = eval(s)", "exec(code)", "c = yaml.load(f)",
               "m = joblib.load(p)", "AutoModel.from_pretrained(p, trust_remote_code=True)"]
    allowed = ["v = ast.literal_eval(s)", "model.eval()", "c = yaml.safe_load(f)", "# pickle.loads is banned",
               "doc = 'never eval(x) here'", "t = torch.load(p, weights_only=True)"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, line in enumerate(samples + allowed):
            f = Path(tmp) / f"s{i}.py"
            f.write_text(line + "\n", encoding="utf-8")
            code = _code_only(f)
            hit = any(re.search(p, code) for p, _ in FORBIDDEN)
            assert hit == (line in samples), line


def test_no_pickle_eval_or_unsafe_loading_in_the_code() -> None:
    files = _python_files()
    assert any(p.parent.name == "learn_tasks" for p in files)
    found = []
    for path in files:
        code = _code_only(path)
        for pattern, what in FORBIDDEN:
            for m in re.finditer(pattern, code):
                line = code[:m.start()].count("\n") + 1
                found.append(f"{path.relative_to(REPO_ROOT)}:{line}: {what}")
        # torch.load must say weights_only=True (or not be used at all: checkpoints are safetensors).
        for m in re.finditer(r"\btorch\s*\.\s*load\s*\(", code):
            call = code[m.end():m.end() + 400].split(")")[0]
            if not re.search(r"weights_only\s*=\s*True", call):
                found.append(f"{path.relative_to(REPO_ROOT)}: torch.load without weights_only=True")
    assert not found, "\n".join(found)


def test_checkpoints_are_safetensors_and_json(tmp_path: Path) -> None:
    import torch

    from learn_tasks.pch import model

    cfg = model.PCHConfig(kind="learn", item_tower="a", d_in=8, d_model=16, n_layers=1, n_heads=2, dropout=0.0,
                          max_len=5, out_dim=8, n_items=3)
    torch.manual_seed(0)
    net = model.build_model(cfg)
    model.save_checkpoint(net, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors: u64 header size, JSON header
    loaded, _ = model.load_checkpoint(tmp_path)
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_remote_model_code_is_off_by_default() -> None:
    assert load_settings(env={}).encode.trust_remote_code is False


# ==================================================================================================
# Secrets: from the environment only, generated, never defaults
# ==================================================================================================
def _example() -> dict[str, str]:
    return dict(line.split("=", 1) for line in (REPO_ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
                if line and not line.startswith("#"))


SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|TOKEN")


def test_env_example_has_no_secret_values() -> None:
    example = _example()
    secrets = [k for k in example if SECRET_NAME.search(k)]
    assert {"POSTGRES_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "REDIS_PASSWORD", "LEARN_API_TOKEN",
            "AIRFLOW_FERNET_KEY", "MILVUS_ROOT_PASSWORD", "MINIO_ROOT_PASSWORD"} <= set(secrets)
    assert all(example[k] == "" for k in secrets), {k: example[k] for k in secrets if example[k]}


def test_compose_secrets_are_required_and_never_defaulted() -> None:
    text = (REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    uses = re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)([^}]*)\}", text)  # $${VAR} is the container shell's, not compose's
    secret_uses = [(name, rest) for name, rest in uses if SECRET_NAME.search(name)]
    assert secret_uses
    for name, rest in secret_uses:
        assert rest.startswith(":?"), f"${{{name}{rest}}}: a secret must be required (:?), never defaulted"
    # No literal credential in the file: every password-like setting is a ${...} reference.
    compose = yaml.safe_load(text)
    for svc_name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if SECRET_NAME.search(key) or re.search(r"PASSWORD|SECRET", key):
                assert "${" in str(value), f"{svc_name}.{key} is a literal"
    # The Airflow admin user gets the generated password (on stdin of the Airflow CLI), never a default.
    init = compose["services"]["airflow-init"]
    assert init["environment"]["AIRFLOW_ADMIN_PASSWORD"].startswith("${AIRFLOW_ADMIN_PASSWORD:?")
    assert '"$${AIRFLOW_ADMIN_PASSWORD}" | airflow users create' in init["command"][1]


def test_generated_env_has_strong_unique_secrets(tmp_path: Path) -> None:
    gen = _gen_env()
    example = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    first, generated = gen.render(example)
    second, _ = gen.render(example)
    a = dict(l.split("=", 1) for l in first.splitlines() if l and not l.startswith("#"))
    b = dict(l.split("=", 1) for l in second.splitlines() if l and not l.startswith("#"))
    assert set(generated) == {k for k, v in _example().items() if v == ""}
    assert "AIRFLOW_ADMIN_PASSWORD" in generated
    for key in generated:
        assert a[key] != b[key], f"{key} is not random"
        assert a[key].lower() not in WELL_KNOWN and len(a[key]) >= 32
        assert re.fullmatch(r"[A-Za-z0-9_=-]+", a[key]), f"{key} needs quoting somewhere"
    assert len({a[k] for k in generated}) == len(generated)  # no secret reused for two purposes
    assert len(base64.urlsafe_b64decode(a["AIRFLOW_FERNET_KEY"])) == 32  # a valid Fernet key
    # Non-secrets keep their values.
    assert a["AIRFLOW_ADMIN_USER"] == _example()["AIRFLOW_ADMIN_USER"]


def test_gen_env_writes_a_private_file_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / ".env"
    script = str(REPO_ROOT / "docker" / "gen_env.py")
    done = subprocess.run([sys.executable, script, "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    before = out.read_text()
    again = subprocess.run([sys.executable, script, "--output", str(out)], capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr and out.read_text() == before
    assert "AIRFLOW_ADMIN_PASSWORD" not in done.stdout.split("generated")[0]  # names only, never values
    values = dict(l.split("=", 1) for l in before.splitlines() if l and not l.startswith("#"))
    assert values["AIRFLOW_ADMIN_PASSWORD"] not in done.stdout


def test_env_files_are_never_committed_or_baked_into_images() -> None:
    ignored = (REPO_ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert ".env" in ignored
    assert ".env" in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""


def test_credentials_come_only_from_the_environment() -> None:
    """No YAML config carries a credential; the settings that hold them are filled from LEARN_* variables."""
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for section, values in raw.items():
            for key in (values or {}) if isinstance(values, dict) else ():
                assert key not in {"token", "registry_url", "redis_url", "password"}, f"{path.name}: {section}.{key}"
    cfg = load_settings(env={"LEARN_INDEX__TOKEN": "root:abc", "LEARN_FEATURES__REGISTRY_URL": "postgresql://u:p@h/db"})
    assert cfg.index.token == "root:abc" and cfg.features.registry_url == "postgresql://u:p@h/db"
