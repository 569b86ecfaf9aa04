"""Run by test_segmentation_fidelity under torchrun (2 gloo processes): one `beit segment` training step over a
global batch of 4 Fashion-MNIST scenes, first in one process (before the group exists), then as 2 ranks x 2
scenes under DDP and FSDP, with seg.sync_bn on (DDP, FSDP) and off (DDP). The task comes from
`build_segment_task`, the wrapping from the loop's `wrap_ddp` / `wrap_fsdp`. Rank 0 writes each run's
BatchNorm running statistics, gradients and BatchNorm class names as JSON to argv[1]."""

import faulthandler
import json
import sys

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from beit.config import Config
from beit.train.distributed import full_tensor, init_distributed, wrap_ddp, wrap_fsdp
from beit.train.segment import build_segment_task

torch.set_num_threads(1)
faulthandler.dump_traceback_later(240, exit=True)  # a collective mismatch fails the test instead of hanging
CFG = {"model": {"name": "beit_fmnist_patch4_64_upernet", "embed_dim": 32, "num_heads": 2,
                 "drop_path_rate": 0.0},
       "data": {"dataset": "fmnist_scenes", "img_size": 64, "in_chans": 1, "mean": [0.286], "std": [0.353],
                "num_workers": 0},
       "seg": {"scenes": [4, 2], "scale": [256, 64]},
       "train": {"device": "cpu", "amp": "none", "progress": False}}


def one_step(strategy: str, sync_bn: bool, rank: int, world: int, info=None) -> dict:
    cfg = Config.model_validate({**CFG, "seg": {**CFG["seg"], "sync_bn": sync_bn}})
    torch.manual_seed(0)  # the same initial weights in every run and on every rank
    task = build_segment_task(cfg, torch.device("cpu"))
    model = task.model
    for m in model.modules():  # dropout draws differ per rank; the test is about BatchNorm
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0
    wrapped = {"one": lambda: model, "ddp": lambda: wrap_ddp(model, info),
               "fsdp": lambda: wrap_fsdp(model, info)}[strategy]()
    per = 4 // world  # this rank's contiguous share of the global batch of 4 training scenes
    x, y = (torch.stack(t) for t in zip(*(task.dataset[i] for i in range(rank * per, (rank + 1) * per))))
    model.train()
    task.step(wrapped, (x, y))["loss"].backward()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    return {"stats": {n: m.running_mean.tolist() + m.running_var.tolist() for n, m in bns.items()},
            "grads": {n: full_tensor(p.grad).flatten().tolist()[:64] for n, p in model.named_parameters()
                      if p.grad is not None},
            "bn_classes": sorted({type(m).__name__ for m in bns.values()})}


results = {"one": one_step("one", True, 0, 1)}  # no process group yet: plain BatchNorm over all 4 scenes
info = init_distributed("cpu", "gloo")
for name, strategy, sync in (("ddp", "ddp", True), ("fsdp", "fsdp", True), ("ddp_no_sync", "ddp", False)):
    results[name] = one_step(strategy, sync, info.rank, info.world_size, info)
if info.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
torch.distributed.destroy_process_group()
