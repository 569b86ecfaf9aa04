"""Process-group setup, DDP / FSDP2 wrapping and full-state gathering, applied from outside the model
(models never import this; torchtitan-style).

`torchrun --nproc_per_node N -m beit pretrain cfg.yaml` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain
`beit pretrain` runs as a single process with no process group at all.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from beit.models.vit import Block


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={spec!r} but CUDA is not available; use train.device=cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def env_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 for a plain run), known before any process group
    exists: what a command needs to size its run before `launch`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_spec: str = "auto", backend: str = "auto") -> DistInfo:
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap_ddp(model: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def wrap_fsdp(model: nn.Module, info: DistInfo, bf16: bool = False, cpu_offload: bool = False) -> nn.Module:
    """FSDP2 in place: `fully_shard` each transformer block, then the root (embeddings, heads).

    Parameters become DTensors sharded over the `info.world_size` processes, so build the optimizer after
    this. bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32. Without a
    process group (a plain single-process run) the model is returned unchanged, like `wrap_ddp`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)

    if cpu_offload and info.device.type != "cuda":
        raise ValueError(f"dist.fsdp_cpu_offload=true offloads from a GPU, but train.device is {info.device}")
    with torch.no_grad():  # ranks initialised with different seeds: start from rank 0's weights, as DDP does
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    kw = {"mesh": init_device_mesh(info.device.type, (dist.get_world_size(),))}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for m in list(model.modules()):
        if isinstance(m, Block):
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    for name in ("forward_features", "forward_head", "forward_mim", "get_intermediate_layers"):
        if hasattr(model, name):  # evaluation calls these directly: they must gather the root's shards too
            register_fsdp_forward_method(model, name)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(model: nn.Module, skip: bool):
    """Context that skips the gradient reduction of a non-final accumulation micro-batch (DDP or FSDP2)."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective: every rank calls it); plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """(model state dict, optimizer state dict) in the single-process layout, whatever the wrapping.

    For FSDP2 this gathers the shards (a collective: every rank must call it) to rank 0's CPU; other ranks
    get empty dicts. The optimizer state is re-keyed from parameter names to the integer positions of a
    plain `optimizer.state_dict()`, so DDP and FSDP checkpoints are one format.
    """
    if not is_fsdp(model):
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    if optimizer is None:
        return msd, None
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not osd:
        return msd, {}
    index, groups = {}, []
    for g in osd["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in g["params"]]
        groups.append({**g, "params": ids})
    return msd, {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                    optim_sd: dict | None = None):
    """Load a single-process-layout state (as `full_state` writes) into a plain, DDP or FSDP2 model."""
    if not is_fsdp(model):
        model.load_state_dict(model_sd)
        if optimizer is not None and optim_sd is not None:
            optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)  # every rank holds the whole dict and keeps its shard
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is None or optim_sd is None:
        return
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != sum(len(g["params"]) for g in optim_sd["param_groups"]):
        raise ValueError("the checkpoint's optimizer holds a different set of parameters than this model's")
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optim_sd["param_groups"]]
    state = {order[i]: v for i, v in optim_sd["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=opts)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` ([n_rank, ...], n may differ) along dim 0, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank gets rank `src`'s values (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src)
    return t


# ------------------------------------------------------------------------------------------------ SyncBN
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch: per-channel sums are all-reduced
    over the process group (autograd-aware, so the backward is the global batch's too), on any device and
    backend. `nn.SyncBatchNorm` does the same on GPUs only; this one also runs on CPU (gloo), which is where
    the equivalence with one process is tested. Same parameters, buffers and state-dict keys as BatchNorm,
    and the same running-statistics update (unbiased variance, `momentum`). Eval mode uses the running
    statistics and communicates nothing."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()  # statistics in fp32 under autocast, as cuDNN's BatchNorm
        local = torch.tensor([xf.numel() // xf.shape[1]], dtype=xf.dtype, device=x.device)
        sums = all_reduce(torch.cat([xf.sum(dims), local]))  # [C + 1]: per-channel sums, pixel count
        count = sums[-1]
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count  # two passes: no E[x^2] - E[x]^2 cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * count / (count - 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Under a process group of more than one process, replace every BatchNorm of `model` (in place) by a
    `GlobalBatchNorm` holding the same parameter and buffer tensors; otherwise return `model` unchanged.
    Call before DDP / FSDP wrapping and before the optimizer is built (the official segmentation configs use
    SyncBN; mmseg's models, like ours, are written with plain BatchNorm)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, device=child.running_mean.device
                                 if child.running_mean is not None else None)
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(bn, key, getattr(child, key))
            bn.train(child.training)
            setattr(model, name, bn)
        else:
            sync_batchnorm(child)
    return model
