"""Training on several processes under ``torchrun``, with PyTorch's own DDP or FSDP (``fully_shard``).

``torchrun --nproc-per-node N -m peftkit.cli train ...`` starts N copies of the same command; each reads its rank
from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins one process group
(gloo for CPU tensors, NCCL for CUDA tensors). Every optimizer step reads one *global* micro-batch of
``world * batch_size`` examples, in the order one process with that batch size would read them, and rank r takes
its r-th contiguous part. With N the loss items (tokens or examples) of the whole global step, summed over ranks,

    loss_r = (world / N) * sum_{items i on rank r} l_i
    grad   = (1 / world) * sum_r grad loss_r = (1 / N) * sum_{all items i} grad l_i

DDP and FSDP average gradients over ranks (the 1 / world), so the update equals the single-process one with batch
``world * batch_size``. Only trainable (adapter) parameters get gradients and are reduced; the frozen base is never
broadcast (DDP) or is sharded and gathered per block only while it computes (FSDP).

Rank 0 alone writes files and prints; every rank reads them. Collectives (all-reduce, all-gather, barrier) run
under the process group's timeout, so a rank that dies or hangs makes the others fail instead of wait forever.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint

STRATEGIES = ("ddp", "fsdp")
DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for the slowest rank before the process group fails
_ENVIRONMENT = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_owns_group = False  # whether init_distributed created the default process group (then teardown destroys it)


def init_distributed(timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group torchrun's environment describes, unless already joined; True when world size > 1.

    CPU tensors go through gloo; with CUDA present, CUDA tensors go through NCCL on device ``LOCAL_RANK`` (one
    process per GPU). ``timeout`` (seconds) bounds every collective, so ranks fail instead of hanging when one dies
    or stops answering.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    missing = [name for name in _ENVIRONMENT if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start several processes with torchrun "
            "(torchrun --nproc-per-node N -m peftkit.cli train ...), which sets them all"
        )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: install a build with distributed support")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
    global _owns_group
    _owns_group = True
    return True


def teardown() -> None:
    """Destroy the process group if :func:`init_distributed` created it (one created by the caller stays)."""
    global _owns_group
    if _owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The random state of ``device``'s generator when it is a GPU (a CPU byte tensor), else None."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global batch: parts differ in size by at most one, earlier ranks take
    the larger ones, so a full batch of ``world * b`` gives rank r ``indices[r*b : (r+1)*b]``."""
    size, extra = divmod(len(indices), world_size)
    start = rank * size + min(rank, extra)
    return list(indices[start : start + size + (rank < extra)])


class ForwardCall(nn.Module):
    """``forward(fn, *args)`` returns ``fn(*args)``: a module around ``model`` through which DDP and FSDP see any
    computation that uses it (a task's loss, an evaluation, a generation), so their hooks run around it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run and the operations the training loop needs across ranks.

    With ``world_size`` 1 every operation is a no-op, so the same loop runs alone or under torchrun.
    Methods marked *collective* must be called by every rank, in the same order.
    """

    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"

    @classmethod
    def setup(cls, strategy: str = "ddp", timeout: float = DEFAULT_TIMEOUT) -> "Distributed":
        """Join torchrun's process group if there is one (see :func:`init_distributed`)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if not init_distributed(timeout):
            return cls(strategy=strategy)
        return cls(dist.get_rank(), dist.get_world_size(), strategy)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's part of a global batch (:func:`shard`)."""
        return shard(indices, self.rank, self.world_size)

    # ------------------------------------------------------------------------------------------------ wrapping

    def wrap(self, model: nn.Module) -> nn.Module:
        """A :class:`ForwardCall` around ``model`` (its trainable parameters set), under DDP or FSDP when distributed.

        DDP: the frozen parameters and the buffers are left out of DDP's start-up broadcast (every rank loaded the
        same base) and of its per-forward buffer sync. FSDP: every transformer block (the model's
        ``_no_split_modules``) is its own ``fully_shard`` unit, the rest goes with the root; frozen and adapter
        parameters are both sharded, only adapter parameters get gradients. Call before building the optimizer:
        FSDP replaces the parameters by sharded ones.
        """
        runner = ForwardCall(model)
        if not self.enabled:
            return runner
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            frozen = [name for name, p in runner.named_parameters() if not p.requires_grad]
            DDP._set_params_and_buffers_to_ignore_for_model(runner, frozen + [name for name, _ in runner.named_buffers()])
            # find_unused_parameters: a trainable parameter the loss never reaches (modules_to_save on a module the
            # task bypasses) would otherwise make DDP fail at the next step; the price is one walk of the autograd
            # graph per micro-batch. static_graph would avoid it, but fails with no_sync (accumulation) in torch 2.13.
            return DDP(runner, find_unused_parameters=True, forward_sync_buffers=False)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from .base_layers import is_quantized

        if any(is_quantized(m) for m in model.modules()):
            # fully_shard flattens and shards parameters as float tensors; bitsandbytes keeps 4-bit weights as
            # packed uint8 storage with a quant_state beside it, which sharding would split from its scales
            raise ValueError("QLoRA (a 4/8-bit base) cannot be sharded with --strategy fsdp: use --strategy ddp, "
                             "which keeps the quantized base whole on every GPU and reduces only adapter gradients")
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.world_size,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(runner, mesh=mesh)
        return runner

    @contextmanager
    def gradient_sync(self, runner: nn.Module, sync: bool) -> Iterator[None]:
        """Inside, backward passes reduce gradients across ranks only if ``sync`` (the last micro-batch of an
        accumulated step); otherwise they accumulate locally and the last one reduces the sum."""
        if sync or not self.enabled:
            yield
        elif self.strategy == "ddp":
            with runner.no_sync():
                yield
        else:
            runner.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                runner.set_requires_gradient_sync(True)

    # ----------------------------------------------------------------------------------------- communication

    def sum(self, values: Sequence[float]) -> list[float]:
        """*Collective*: each value summed over ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: float) -> list[float]:
        """*Collective*: every rank's ``value``, by rank."""
        if not self.enabled:
            return [float(value)]
        tensor = torch.tensor([float(value)], dtype=torch.float64)
        values = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(values, tensor)
        return [float(v) for v in values]

    def check_same(self, what: str, value: float, fix: str) -> None:
        """*Collective*: raise on every rank (so all stop together) unless every rank holds the same ``value``."""
        values = self.gather(value)
        if len(set(values)) > 1:
            seen = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(values))
            raise ValueError(f"the processes disagree on {what} ({seen}): {fix}")

    def barrier(self) -> None:
        """*Collective*: wait until every rank gets here (e.g. until rank 0 has written a checkpoint)."""
        if self.enabled:
            dist.barrier()

    def full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """*Collective*: complete tensors from sharded ones (FSDP's DTensors are all-gathered; others pass)."""
        from torch.distributed.tensor import DTensor

        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}

    def like(self, full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``full`` laid out as ``target``: this rank's shard if ``target`` is a sharded DTensor (no communication:
        every rank holds ``full``), else ``full`` itself."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(target, DTensor):
            return full
        full = full.to(device=target.device_mesh.device_type, dtype=target.dtype)  # files load on the CPU
        return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)

    def combine(self, part: dict[str, Any]) -> dict[str, Any]:
        """*Collective*: one evaluation from every rank's ``part`` (same keys on every rank): numbers are summed,
        lists concatenated in rank order (the order of the examples, as :func:`shard` splits them contiguously)."""
        if not self.enabled:
            return dict(part)
        out: dict[str, Any] = {}
        for key, value in part.items():
            if isinstance(value, list):
                parts: list[Any] = [None] * self.world_size
                dist.all_gather_object(parts, value)  # our own lists of ints, never user files
                out[key] = [v for p in parts for v in p]
            else:
                out[key] = self.sum([value])[0]
        return out

    def rng_states(self, device: torch.device | None = None) -> list[torch.Tensor]:
        """*Collective*: every rank's torch CPU RNG state, or its ``device``'s (a GPU) with a CUDA ``device``, by
        rank (dropout masks differ per rank)."""
        state = torch.get_rng_state() if device is None else cuda_rng_state(device)
        if not self.enabled:
            return [state]
        states = [torch.empty_like(state) for _ in range(self.world_size)]
        dist.all_gather(states, state)
        return states

    # ------------------------------------------------------------------------------------------------- files

    def adapters(self, model: nn.Module) -> checkpoint.Adapters:
        """*Collective*: every adapter of ``model`` (a PeftModel) as (config, complete tensors under file keys)."""
        return {name: (config, self.full(model.adapter_tensors(name))) for name, config in model.peft_config.items()}

    def save_pretrained(self, model: nn.Module, directory: str | os.PathLike) -> None:
        """*Collective*: write ``model``'s adapters as one HF PEFT folder, atomically, from rank 0."""
        adapters = self.adapters(model)
        if self.is_main:
            checkpoint.save_adapters(directory, adapters)
