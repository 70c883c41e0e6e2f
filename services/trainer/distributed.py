"""Data-parallel training across processes with torch.distributed (launched by torchrun).

The protocol, per process group of W ranks:

Start:
1. every rank loads the model architecture from `model_dir` (a shared image or volume);
2. rank 0 builds its trainer as in a single process (store, checkpoint resume, Kafka);
3. rank 0 broadcasts the reference weights, the policy weights and the optimiser state,
   so every rank starts from rank 0's exact state.

Each optimiser step:
1. rank 0 alone reads samples.v1, drops and holds out samples, computes advantages, and
   broadcasts the step's collated rows, advantages and token count (`StepWork`);
2. the step's micro-batches are dealt out round-robin: rank r computes micro-batches
   r, r+W, r+2W, ...; every loss is divided by the step's total token count, so the sum
   of every rank's gradients is the gradient of the whole step;
3. gradients are summed across ranks with one all-reduce (a rank with no micro-batch
   contributes zeros); every rank then clips and steps the same way on the same numbers,
   so the weights stay identical without ever being sent again.

Rank 0 alone commits: checkpoints, the step ledger, the eval gate and publishing. Other
ranks keep no state of their own; after a restart they get rank 0's state again. Stop:
rank 0 broadcasts `None` after its shutdown checkpoint and every rank leaves.

Gradients are synchronised by hand rather than with DistributedDataParallel: the trainer
calls the decoder and the output layer separately (policy.token_logprobs) and not the
wrapped module's forward, which DDP's reducer relies on.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from services.trainer.batching import Collated


@dataclass(frozen=True)
class Group:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int

    @property
    def is_leader(self) -> bool:
        """Rank 0: reads Kafka, checkpoints and publishes."""
        return self.rank == 0


@dataclass
class StepWork:
    """What rank 0 broadcasts for one optimiser step."""

    collated: Collated
    """The rows that train this step (zero-advantage rows already dropped)."""
    advantages: torch.Tensor
    """Per-row advantage, shape (rows,)."""
    n_tokens: int
    """Completion tokens of the whole step: every micro-batch's loss is divided by it."""


@dataclass
class Reload:
    """Broadcast by rank 0 instead of a StepWork when it reloaded weights (a followed
    rollback): every rank then takes rank 0's weights and fresh optimiser state."""


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(timeout_s: float, backend: str | None = None) -> Group | None:
    """Join the process group torchrun described (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); None for a single process. `backend` None: gloo, because the trainer
    computes on CPU (nccl needs every tensor on a GPU)."""
    if world_size_from_env() <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend or "gloo", timeout=dt.timedelta(seconds=timeout_s))
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size())


def close(group: Group | None) -> None:
    """Leave the process group (no-op for a single process)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


def micro_batches(n_rows: int, micro_batch_size: int, group: Group | None) -> list[tuple[int, int]]:
    """The [lo, hi) row ranges this rank forwards and backwards in a step of `n_rows`."""
    ranges = [(lo, min(lo + micro_batch_size, n_rows)) for lo in range(0, n_rows, micro_batch_size)]
    if group is None:
        return ranges
    return ranges[group.rank :: group.world_size]


def broadcast_object(obj: Any, group: Group) -> Any:
    """Rank 0's `obj` on every rank (pickled; the others pass anything, e.g. None)."""
    box = [obj if group.is_leader else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place (same order on every rank)."""
    for t in tensors:
        dist.broadcast(t, src=0)


def sync_start(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    reference: torch.nn.Module | None,
    group: Group,
) -> None:
    """Give every rank rank 0's reference weights, policy weights and optimiser state."""
    with torch.no_grad():
        if reference is not None:
            broadcast_tensors(t for _, t in sorted(reference.state_dict().items()))
        broadcast_tensors(t for _, t in sorted(model.state_dict().items()))
    state = broadcast_object(optimizer.state_dict() if group.is_leader else None, group)
    if not group.is_leader:
        optimizer.load_state_dict(state)


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient across ranks (None counts as zeros), in one
    all-reduce over a flat buffer."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
