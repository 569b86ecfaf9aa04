"""Training-step throughput of a preset without data loading: forward + backward + AdamW on random input.

    OMP_NUM_THREADS=2 python scripts/bench_step.py [--preset beit_fmnist_patch4_32] [--batch 128] [--steps 15]
                                                    [--compile]

A segmentation preset (SEG_PRESETS) trains on random masks with the decode + 0.4 x auxiliary loss, both on
logits upsampled to the image size, as `beit segment` does.

Prints images/s and the operators that take the CPU time, to tell a compute-bound loop from one waiting
on data. Compare with the img/s the training loop's progress bar shows for the same preset and batch.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from beit.models import PRESETS, SEG_PRESETS, create_model, create_segmenter
from beit.models.segmentation import upsample_logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="beit_fmnist_patch4_32", choices=sorted(PRESETS) + sorted(SEG_PRESETS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each block, as train.compile=true does")
    args = p.parse_args()

    torch.manual_seed(0)
    seg = args.preset in SEG_PRESETS
    model = (create_segmenter(args.preset) if seg else create_model(args.preset, num_classes=10)).train()
    backbone = model.backbone if seg else model
    if args.compile:
        for m in backbone.blocks:
            m.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pe = backbone.patch_embed
    x = torch.randn(args.batch, pe.in_chans, pe.img_size, pe.img_size)  # [B, C, H, W]
    y = torch.randint(0, model.num_classes, (args.batch, pe.img_size, pe.img_size) if seg else (args.batch,))

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            if not seg:
                return F.cross_entropy(model(x).float(), y)  # logits [B, 10]
            logits, aux = model.forward_train(x)  # [B, K, H/4, W/4], [B, K, H/16, W/16]
        size = x.shape[-2:]
        return (F.cross_entropy(upsample_logits(logits.float(), size), y)
                + model.aux_weight * F.cross_entropy(upsample_logits(aux.float(), size), y))

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: allocator and kernel selection
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    print(f"{args.preset}, batch {args.batch}, amp {args.amp}, compile {args.compile}, "
          f"{torch.get_num_threads()} threads: {args.batch / dt:.0f} img/s ({dt * 1000:.0f} ms/step)")
    with torch.autograd.profiler.profile() as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
