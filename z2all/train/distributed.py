"""The torchrun environment and the ways a single-device model is spread over processes, all applied from
outside the model: activation checkpointing, torch.compile, DDP (with optional communication hooks) or
FSDP2 (`fully_shard` per block, then the root).

Process groups: NCCL on GPU, gloo on CPU. One process per GPU; `LOCAL_RANK` picks the GPU.

    torchrun --standalone --nproc_per_node=8 -m z2all train --config configs/gpu_1b.toml
    # two nodes (run on each; node_rank 0 and 1; the endpoint is node 0's address):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=10.0.0.1:29500 --rdzv_id=z2all -m z2all train --config configs/gpu_1b.toml

Communication hooks (DDP only): `bf16` casts gradient buckets to bf16 before the all-reduce (half the
bytes); `powersgd` sends a rank-r low-rank approximation with error feedback (much less traffic; its error
feedback state is not checkpointed, so a resumed run restarts it). The original llm-zero2all project's
2-node run spent 19 s communicating vs 7 s computing per iteration, which is what these are for.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from z2all.config import opt
from z2all.utils import UserError, pick_device


@dataclass
class DistConfig:
    strategy: str = opt("ddp", "how to use several processes: ddp (replicate, all-reduce gradients) or fsdp "
                        "(FSDP2 fully_shard per block: params, grads and optimizer state sharded)",
                        choices=("ddp", "fsdp"))
    comm_hook: str = opt("none", "DDP gradient communication hook", choices=("none", "bf16", "powersgd"))
    powersgd_rank: int = opt(4, "PowerSGD matrix approximation rank")
    powersgd_start_iter: int = opt(10, "all-reduce normally for this many iterations before PowerSGD starts")
    bucket_cap_mb: int = opt(25, "DDP gradient bucket size in MB")
    timeout_s: int = opt(1800, "collective timeout in seconds (checkpoint saves and evals happen on rank 0)")


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str, timeout_s: int = 1800) -> DistInfo:
    """Read the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), pick this process's
    device and start the process group when there is more than one process."""
    import datetime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise UserError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun "
                            "(torchrun --standalone --nproc_per_node=N -m z2all train ...)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=device)


def cleanup(finished: bool = False) -> None:
    """End the process group. finished: every rank got here normally, so all of them end it together (a
    barrier first). In CI one rank of a finished 2-process gloo run once aborted at exit ("terminate called
    without an active exception") after rank 0 had printed its summary; the cause was not found and dozens
    of local runs did not repeat it. After an error no barrier: the failed rank may never arrive."""
    if dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (a no-op with one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all processes (a no-op with one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_object(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- applied from outside the model

def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (about one block's worth of
    activations kept instead of all L). Patches each block's `forward` on the instance, so parameter names
    (and checkpoints) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each block in place (`Module.compile` keeps parameter names, so checkpoints stay
    compatible); blocks are identical, so one compiled graph is reused L times."""
    for block in model.layers:
        block.compile()


def wrap_model(model: torch.nn.Module, info: DistInfo, cfg: DistConfig, param_dtype: torch.dtype):
    """DDP or FSDP2 around an already-placed model; the model itself when there is one process."""
    if not info.distributed:
        if cfg.comm_hook != "none":
            raise UserError(f"dist.comm_hook={cfg.comm_hook} needs several processes (torchrun --nproc_per_node>1)")
        return model
    if cfg.strategy == "fsdp":
        if cfg.comm_hook != "none":
            raise UserError("dist.comm_hook applies to DDP only; use dist.strategy=ddp or dist.comm_hook=none")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    ddp = DDP(model, device_ids=ids, bucket_cap_mb=cfg.bucket_cap_mb, gradient_as_bucket_view=True)
    register_comm_hook(ddp, cfg)
    return ddp


def _bf16_compress_hook_gloo(process_group, bucket):
    """torch's `bf16_compress_hook` refuses anything but NCCL/XCCL; this is the same algorithm for gloo
    (CPU runs and tests): cast the bucket to bf16, pre-divide by the world size, all-reduce, cast back."""
    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    compressed = buf.to(torch.bfloat16).div_(group.size())
    fut = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(decompress)


def register_comm_hook(ddp, cfg: DistConfig) -> None:
    if cfg.comm_hook == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        nccl = dist.get_backend() == "nccl"
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook if nccl else _bf16_compress_hook_gloo)
    elif cfg.comm_hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
                                            start_powerSGD_iter=max(2, cfg.powersgd_start_iter))
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def is_fsdp(model: torch.nn.Module) -> bool:
    if "torch.distributed.fsdp" not in sys.modules:  # never imported, so nothing was sharded (saves ~2 s)
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """After a forward without backward (evaluation) FSDP2 leaves some modules' parameters gathered; the
    optimizer and state-dict code expect the sharded ones registered, so reshard everything."""
    if not is_fsdp(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def sync_context(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP `no_sync`; FSDP2 reduce-scatter off),
    reducing once on the last micro-step."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
