"""Public datasets: the registered ones, fetched from a local mirror or their public URL with a sha256 check.

:func:`fetch_dataset` places a dataset's files under ``$LEARN_HOME/raw/<name>/``; a mirror
(``LEARN_DATA_MIRROR`` or a ``shared/datasets`` folder next to the repository) is used when present,
so nothing needs the network. :func:`ensure_prepared` fetches and prepares one in a single call.
"""
from __future__ import annotations

import hashlib
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learn_tasks.config import REPO_ROOT, Settings
from learn_tasks.data.datasets import load_manifest, prepare_dataset
from learn_tasks.data.readers import DataError


@dataclass(frozen=True)
class PublicDataset:
    """A registered public dataset: its reader format, its files with their sha256, where to download them."""

    name: str
    format: str
    files: dict[str, str | None]  # file name -> sha256 (None: not published, verified on second fetch)
    urls: dict[str, str]  # file or archive name -> public URL
    archive_member_prefix: str = ""


DATASETS: dict[str, PublicDataset] = {
    "amazon-books-2014-sample": PublicDataset(
        "amazon-books-2014-sample", "seqrec",
        {"interactions.csv": "edb295fefa07e63b91b2a5464217cc34bfb0ca000be388bd716f314c4de12e29",
         "items.csv": "823a9e2333de5db65abf4607b51928a06ad3067f0d802fc75dbda3f5043dcd9c"},
        # The SeqRec benchmark publishes this sample as proc.zip; the CSV pair is its lossless conversion.
        {"proc.zip": "https://github.com/Tiny-Snow/SeqRecBenchmark-Datasets/raw/3bc413ed/"
                     "data/amazon2014-book_1000000/proc.zip"},
    ),
    "movielens-latest-small": PublicDataset(
        "movielens-latest-small", "movielens",
        {"ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
         "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
         "tags.csv": "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d"},
        {"ml-latest-small.zip": "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"},
        archive_member_prefix="ml-latest-small/",
    ),
    "amazon-books-2014": PublicDataset(
        "amazon-books-2014", "amazon2014",
        {"ratings_Books.csv": None, "meta_Books.json.gz": None},
        {"ratings_Books.csv": "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/ratings_Books.csv",
         "meta_Books.json.gz": "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Books.json.gz"},
    ),
}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_mirror(cfg: Settings) -> Path | None:
    """The local mirror of public datasets: ``data.mirror``, else a ``shared/datasets`` folder by the repository."""
    if cfg.data.mirror:
        return Path(cfg.data.mirror)
    for cand in (Path.cwd() / ".." / "shared" / "datasets", REPO_ROOT.parent / "shared" / "datasets"):
        if cand.is_dir():
            return cand.resolve()
    return None


def fetch_dataset(cfg: Settings, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Place dataset ``name``'s files under ``$LEARN_HOME/raw/<name>/``, checking each file's sha256."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    ds = DATASETS[name]
    dest = cfg.paths.raw(name)
    dest.mkdir(parents=True, exist_ok=True)
    mirror = default_mirror(cfg)
    source = None
    if mirror is not None and (mirror / name).is_dir():
        for fname in ds.files:
            src = mirror / name / fname
            if not src.exists():
                raise DataError(src, f"mirror {mirror} lacks {fname} of dataset {name}")
            if not (dest / fname).exists() or sha256_file(dest / fname) != sha256_file(src):
                tmp = dest / f".tmp-{fname}"
                shutil.copyfile(src, tmp)
                tmp.replace(dest / fname)
        source = f"mirror:{mirror / name}"
    else:
        if ds.format == "seqrec":
            raise DataError(name, "this sample is published as a SeqRec proc.zip that needs its own conversion; "
                            "set LEARN_DATA_MIRROR to a folder holding amazon-books-2014-sample/*.csv")
        for fname, url in ds.urls.items():
            _download(url, dest / fname, timeout_s)
            if fname.endswith(".zip"):
                with zipfile.ZipFile(dest / fname) as zf:
                    for member in ds.files:
                        with zf.open(ds.archive_member_prefix + member) as src, open(dest / member, "wb") as out:
                            shutil.copyfileobj(src, out)
        source = "download"
    checks = {}
    for fname, digest in ds.files.items():
        got = sha256_file(dest / fname)
        if digest is not None and got != digest:
            raise DataError(dest / fname, f"sha256 mismatch: expected {digest}, got {got}")
        checks[fname] = got
    return {"dataset": name, "path": str(dest), "source": source, "format": ds.format, "sha256": checks}


def _download(url: str, dest: Path, timeout_s: float) -> None:
    tmp = dest.with_name(f".tmp-{dest.name}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(url, f"download failed ({exc}); no network? Set LEARN_DATA_MIRROR to a local copy") from exc
    tmp.replace(dest)


def ensure_prepared(cfg: Settings, name: str) -> dict[str, Any]:
    """Fetch and prepare a registered public dataset unless it is already prepared."""
    if (cfg.paths.dataset(name) / "manifest.json").exists():
        return load_manifest(cfg, name)
    info = fetch_dataset(cfg, name)
    return prepare_dataset(cfg, info["format"], info["path"], name)
