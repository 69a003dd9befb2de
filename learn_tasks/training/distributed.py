"""Data-parallel PCH training under ``torch.distributed``: the process-group helpers.

The processes are started by ``torchrun`` with :mod:`learn_tasks.training.launch` (gloo on CPU, NCCL on
GPUs). Every rank runs the ordinary :func:`learn_tasks.training.train.train_model`; the training loop calls
the small hooks below, which do nothing in a single process. Together they give the DDP scheme:

* the same initial weights everywhere (:func:`broadcast_module`, rank 0's copy wins);
* each rank trains on its own share of every epoch's batches (:func:`shard_batches`: the batch list is
  built from one random stream, synchronised across ranks at the start of each epoch, and rank ``r``
  takes batches ``r, r + world, ...``; every rank gets the same number of steps, the shorter shares
  being padded by wrapping around, as ``DistributedSampler`` does);
* gradients averaged over ranks after every backward pass (:func:`average_gradients`), so the
  optimiser state, and hence the weights, stay identical on every rank;
* collective decisions (a non-finite loss, the wall-clock budget) taken on all ranks at once
  (:func:`any_across`) so no rank leaves the loop while another waits in a collective;
* one writer: only rank 0 writes the run folder; the others learn its name (:func:`broadcast_str`).

The effective batch is ``world x train.batch_size``; scale ``train.lr`` with it if needed.

Why not ``torch.nn.parallel.DistributedDataParallel`` itself: the PCH step calls several model methods
(item inputs, user states, item tower) rather than one ``forward``, and DDP's reducer only works through
``forward``. Averaging the flattened gradients with one all-reduce per step is what DDP does, minus the
overlap with the backward pass, which matters little for a model this small.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("learn.distributed")
T = TypeVar("T")


# ==================================================================================================
# Process group
# ==================================================================================================
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def default_backend() -> str:
    """NCCL when this process has a GPU, else gloo."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init(backend: str | None = None, init_method: str | None = None, rank_: int | None = None,
         world_size_: int | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    ``rank_``/``world_size_``/``init_method`` replace the environment (e.g. ``file://`` rendezvous in tests).
    On NCCL each process is pinned to GPU ``LOCAL_RANK`` so that ``"cuda"`` means its own device.
    """
    r = int(os.environ.get("RANK", "0")) if rank_ is None else rank_
    w = int(os.environ.get("WORLD_SIZE", "1")) if world_size_ is None else world_size_
    local = int(os.environ.get("LOCAL_RANK", str(r)))
    backend = backend or default_backend()
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=r, world_size=w)
    log.info("rank %d/%d (local %d) on %s via %s", r, w, local, device, backend)
    return DistInfo(r, w, local, backend, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ==================================================================================================
# Hooks called by the training loop (no-ops in a single process)
# ==================================================================================================
def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (DDP's start-up broadcast)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_str(text: str) -> str:
    """Rank 0's ``text`` on every rank (UTF-8 bytes in a tensor: no pickling of Python objects)."""
    if not is_distributed():
        return text
    dev = _comm_device()
    raw = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=dev)
    size = torch.tensor([raw.numel()], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=0)
    buf = raw if rank() == 0 else torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode("utf-8")


def sync_rng(rng: np.random.Generator) -> None:
    """Give every rank rank 0's random stream (its state travels as JSON)."""
    if is_distributed():
        rng.bit_generator.state = json.loads(broadcast_str(json.dumps(rng.bit_generator.state)))


def shard_batches(batches: Iterable[T], rng: np.random.Generator | None = None) -> Iterator[T]:
    """This rank's share of an epoch's batches; all of them in a single process.

    ``batches`` must be a lazy generator drawing on ``rng``: the stream is synchronised first, so every
    rank builds the identical batch list, and each takes every ``world``-th batch. Afterwards each rank's
    stream jumps ahead by its rank, so per-step sampling (random negatives) differs between ranks; the
    next epoch re-synchronises.
    """
    if not is_distributed():
        yield from batches
        return
    if rng is not None:
        sync_rng(rng)
    everything = list(batches)
    w, r = world_size(), rank()
    if rng is not None and r:
        rng.bit_generator.state = rng.bit_generator.jumped(r).state
    if not everything:
        return
    per_rank = -(-len(everything) // w)  # ceil: the same number of steps on every rank
    for k in range(per_rank):
        yield everything[(k * w + r) % len(everything)]


def average_gradients(module: torch.nn.Module) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of the flattened gradients).

    A parameter without a gradient on this rank contributes zeros, so every rank reduces tensors of the
    same size in the same order.
    """
    if not is_distributed():
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def _reduce_scalar(value: float, op) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def any_across(flag: bool) -> bool:
    """True on every rank when it is true on any rank (a decision all ranks must take together)."""
    if not is_distributed():
        return bool(flag)
    return _reduce_scalar(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


def mean_across(value: float) -> float:
    """The mean of ``value`` over the ranks (e.g. an epoch's training loss)."""
    if not is_distributed():
        return float(value)
    return _reduce_scalar(value, dist.ReduceOp.SUM) / world_size()


def sum_across(value: float) -> float:
    if not is_distributed():
        return float(value)
    return _reduce_scalar(value, dist.ReduceOp.SUM)
