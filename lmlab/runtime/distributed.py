"""Several processes, one run: ``torch.distributed`` set up from torchrun's or SLURM's environment, and
the few collectives the trainer needs. With one process every function here is a no-op.

How the work is shared (data parallelism)::

    dataset.batch_size = 8 columns          rank 0             rank 1          (world size 2)
    ┌ a g m s b h n t ┐                    ┌ a g m s ┐        ┌ b h n t ┐
    │ ...             │   ──────────▶      │ ...     │        │ ...     │
    each rank owns batch_size / world_size columns (and eval_batch_size / world_size for evaluation)

- Every rank runs the model on its columns; DistributedDataParallel averages the gradients during the
  backward pass, so one step equals one process's step at the full batch (same hyperparameters, same
  figures whatever the number of processes).
- Every decision taken from data — a diverged loss, a stop signal, the time budget, the validation loss
  — is all-reduced first, so all ranks take it at the same step; a rank that decided alone would
  leave the others waiting in a collective forever.
- Only rank 0 writes (checkpoints, metrics, samples, W&B). A checkpoint holds every rank's RNG and
  model state, so each rank resumes exactly where it stopped.
- Backends: NCCL for CUDA tensors, gloo for CPU ones (the control flags always travel through gloo).
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmlab.errors import ConfigError
from lmlab.runtime.launch import launched_processes, under_torchrun


@dataclass(frozen=True)
class Place:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def place() -> Place:
    """Where this process stands (a single process when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Place()
    return Place(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def setup() -> Place:
    """Join the process group when a launcher started several processes (idempotent).

    torchrun exports ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``…; under SLURM (``hydra/launcher=slurm``
    with ``tasks_per_node`` > 1) submitit's job environment supplies them."""
    if launched_processes()[1] <= 1 or (dist.is_available() and dist.is_initialized()):
        return place()
    if not under_torchrun():  # a SLURM task: derive torchrun's variables from the job
        from submitit.helpers import TorchDistributedEnvironment

        job = TorchDistributedEnvironment()
        for key, value in (("MASTER_ADDR", job.master_addr), ("MASTER_PORT", job.master_port), ("RANK", job.rank),
                           ("WORLD_SIZE", job.world_size), ("LOCAL_RANK", job.local_rank)):  # fmt: skip
            os.environ.setdefault(key, str(value))  # what the user set (say MASTER_PORT) stays
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    atexit.register(teardown)
    return place()


def teardown() -> None:
    """Leave the process group (idempotent). :func:`setup` registers it to run at exit, on every path
    out (success, an error's exit code, a stop signal): a group still alive when the interpreter
    finalises is torn down by C++ destructors, and gloo's worker threads then abort the process
    (``terminate called without an active exception``, exit -6) — a finished rank reported as failed."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave() -> None:
    """Every rank, once the run's collective work is done (the test): wait until all have arrived, free what
    still holds the group (DistributedDataParallel's reducer, by garbage collection) and leave it, while the
    interpreter is whole. From here each process is on its own (rank 0 goes on to its single-process work:
    the test_with methods, generation). A rank that left the group first while the others still held it, or
    whose group was freed only by interpreter finalisation, could abort in gloo's destructors."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def data_parallel(step: torch.nn.Module, device: torch.device, sparse_gradients: bool) -> torch.nn.Module:
    """``step`` (a module computing one window's losses) under DistributedDataParallel.

    DDP expects a sparse gradient from every ``nn.Embedding(sparse=True)``; a model whose sparse lookup
    is folded into a dense gradient (a tied embedding) says so with ``sparse_gradients=False``, and DDP is
    told the truth while it is built (it reads the flag only then)."""
    from torch.nn.parallel import DistributedDataParallel

    sparse = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    flipped = [] if sparse_gradients else [m for m in step.modules() if isinstance(m, sparse) and m.sparse]
    for module in flipped:
        module.sparse = False
    try:
        return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    finally:
        for module in flipped:
            module.sparse = True


def check_divisible(batch_size: int, key: str) -> None:
    """Refuse, in one line saying how to make it divide, a ``batch_size`` the ranks cannot share equally."""
    world = place().world_size
    if batch_size % world:
        lower, upper = batch_size // world * world, -(-batch_size // world) * world
        raise ConfigError(
            f"{key}={batch_size} does not split over {world} processes (each owns an equal share of "
            f"the columns); use a multiple of {world}, e.g. {key}={upper}" + (f" or {lower}" if lower else "")
        )


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place."""
    if place().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor; ``tensor`` itself where there is one rank)."""
    world = place().world_size
    return all_reduce_sum(tensor.clone()) / world if world > 1 else tensor


def agree_max(value: float) -> float:
    """The largest of every rank's ``value`` (any rank's stop signal or crossed deadline stops all)."""
    if place().world_size == 1:
        return value
    flag = torch.tensor([float(value)], dtype=torch.float64)  # CPU: travels through gloo, no GPU sync
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled in memory between the ranks; nothing read from files)."""
    if place().world_size == 1:
        return [obj]
    objects: list[Any] = [None] * place().world_size
    dist.all_gather_object(objects, obj)
    return objects


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if place().world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if place().world_size > 1:
        dist.barrier()
