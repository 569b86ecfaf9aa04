"""What should torch.compile cover: nothing, each block, the whole model, or the whole pretraining step?

Builds the pretraining step of `beit bench` (forward with the frozen tokenizer, loss, backward, fused AdamW on
random input of the real shapes) once per scope, each with its own model of the same seed, and times them in
alternating rounds in one process (the median round each), as `beit bench` does:

- eager:  no compilation;
- blocks: each transformer block (what `train.compile=true` does);
- model:  `model.compile()`; the masked-token gather splits it into graphs of data-dependent shape;
- step:   the tokenizer, model and loss as one compiled function.

    OMP_NUM_THREADS=2 python scripts/compile_scope.py                     # Fashion-MNIST row, batch 128
    python scripts/compile_scope.py --preset beit_base_patch16_224_8k_vocab --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from beit import bench
from beit.models import create_model
from beit.train.loop import compile_blocks
from beit.train.pretrain import make_mim_step

SCOPES = ("eager", "blocks", "model", "step")


def build(scope: str, preset: str, batch: int, device: torch.device, tokenizer) -> bench.Step:
    torch.manual_seed(0)
    model = create_model(preset).to(device)
    data = bench.mim_batch(bench.preset_kwargs(preset), tokenizer, batch, device)
    mim = make_mim_step(tokenizer)

    def loss():
        return mim(model, data)["loss"]

    if scope == "blocks":
        compile_blocks(model)
    elif scope == "model":
        model.compile()
    elif scope == "step":
        loss = torch.compile(loss)
    return bench.Step(scope, bench.train_step(model, loss, device, "bf16"), batch, flops=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="beit_fmnist_patch4_32_512_vocab")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    device = torch.device(args.device)
    tokenizer = bench.build_tokenizer(bench.default_tokenizer(args.preset), device)
    steps = []
    for scope in args.scopes:
        t0 = time.perf_counter()
        steps.append(bench.prepare(lambda: build(scope, args.preset, args.batch, device, tokenizer), device, warmup=3))
        print(f"{scope:<7} built and warmed up in {time.perf_counter() - t0:.1f} s (compilation included)", flush=True)
    times = bench.time_alternating(steps, device, args.iters, args.repeats)
    base = times[steps[0].name]
    for s in steps:
        print(f"{s.name:<7} {s.batch / times[s.name]:8.1f} img/s  {base / times[s.name]:.3f}x {steps[0].name}")


if __name__ == "__main__":
    main()
