"""The torchrun entry of data-parallel training: one process per device, each running :func:`train_model`.

Launch with ``torchrun`` (gloo on CPU, NCCL on GPUs)::

    torchrun --standalone --nproc_per_node 2 -m learn_tasks.training.launch --dataset amazon-books --protocol loo
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint host0:29500 --nproc_per_node 8 -m learn_tasks.training.launch ...

Rank 0 prints the training summary as one JSON line. How the ranks cooperate is described in
:mod:`learn_tasks.training.distributed`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import numpy as np

from learn_tasks import schema as S
from learn_tasks.config import MODEL_KINDS, load_settings
from learn_tasks.training import distributed as D
from learn_tasks.training.train import train_model


def train_distributed(cfg, dataset: str, protocol: str = "loo", model: str | None = None, epochs: int | None = None,
                      budget_s: float | None = None, warm_start: str | None = None, backend: str | None = None,
                      embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Join the process group, train with :func:`learn_tasks.training.train.train_model` on every rank, leave it.

    Returns the training summary (the same on every rank; rank 0 wrote the run folder) plus ``world_size``
    and ``backend``. The device follows the backend: each rank's own GPU on NCCL, the CPU on gloo.
    """
    info = D.init(backend)
    try:
        cfg = cfg.with_overrides(train={"device": "cuda" if info.backend == "nccl" else "cpu"})
        summary = train_model(cfg, dataset, protocol=protocol, model=model, epochs=epochs, budget_s=budget_s,
                              warm_start=warm_start, embeddings=embeddings)
        D.barrier()
        return {**summary, "world_size": info.world_size, "backend": info.backend}
    finally:
        D.shutdown()


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m learn_tasks.training.launch --dataset NAME [--protocol loo] [--model KIND] ...``"""
    parser = argparse.ArgumentParser(prog="learn_tasks.training.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--protocol", default="loo", choices=list(S.PROTOCOLS))
    parser.add_argument("--model", default=None, choices=list(MODEL_KINDS), help="default: pipeline.model")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--warm-start", default=None)
    parser.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl on GPU, else gloo")
    parser.add_argument("--config", "-c", action="append", default=[], help="extra YAML config file(s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    cfg = load_settings(files=args.config, overrides=args.overrides)
    summary = train_distributed(cfg, args.dataset, args.protocol, args.model, args.epochs, args.budget_s,
                                args.warm_start, args.backend)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
