"""`beit bench`: training-step throughput, ours vs HF transformers / timm (see beit/bench.py).

Kept free of torch imports so that `beit --help` stays fast; the work happens in `beit.bench`.
"""

from __future__ import annotations

import json
from pathlib import Path

# The standard comparison rows: (preset, batch, what we compare against).
ROWS = {
    "fmnist-mim": dict(preset="beit_fmnist_patch4_32_512_vocab", batch=128,
                       title="Fashion-MNIST MIM step (dim 192, 6 blocks, patch 4, 32 px, vocab 512) vs HF"),
    "fmnist-ft": dict(preset="beit_fmnist_patch4_32", batch=128,
                      title="Fashion-MNIST fine-tuning step (same ViT, 10 classes) vs timm"),
    "vitb-mim": dict(preset="beit_base_patch16_224_8k_vocab", batch=8,
                     title="ViT-B/16 224 MIM step vs HF"),
}


def register(sub):
    p = sub.add_parser("bench", help="time our training step against HF transformers / timm",
                       description="Time forward + backward + AdamW on random input (tokenizer included for "
                                   "pretraining), ours and the reference implementations alternately; medians.")
    p.add_argument("--row", choices=[*ROWS, "all"], default="all", help="a standard comparison row")
    p.add_argument("--preset", help="any model preset instead of --row (a *_vocab preset times pretraining)")
    p.add_argument("--batch", type=int, help="batch size (default: the row's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    p.add_argument("--tokenizer", help="pretraining tokenizer: fmnist_dvae, dall-e-random, or a trained one's path")
    p.add_argument("--no-baselines", action="store_true", help="time ours only")
    p.add_argument("--compile", action="store_true", help="torch.compile our blocks (as train.compile=true)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    p.add_argument("--iters", type=int, default=5, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds; the median round is reported")
    p.add_argument("--loop", type=int, metavar="N", help="also run the real Fashion-MNIST pretraining loop for "
                                                         "N steps (data pipeline included) and compare it "
                                                         "with the step, alternating")
    p.add_argument("--loop-rounds", type=int, default=3, help="alternating loop/step rounds for --loop; the "
                                                              "median ratio is reported")
    p.add_argument("--loop-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for --loop (and its step), e.g. data.num_workers=0")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of our step's top operators")
    p.add_argument("--json", type=Path, metavar="PATH", help="write all results as JSON")
    p.set_defaults(func=run)


def run(args):
    import torch

    from beit import bench
    from beit.train.distributed import resolve_device

    device = resolve_device(args.device)
    if args.amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 needs a CUDA device (the loss scaler); use --amp bf16 on CPU")
    if args.preset:
        rows = {args.preset: dict(preset=args.preset, batch=args.batch or 32, title=args.preset)}
    else:
        names = ROWS if args.row == "all" else [args.row]
        rows = {n: {**ROWS[n], **({"batch": args.batch} if args.batch else {})} for n in names}
    peak = bench.matmul_peak_tflops(device, torch.bfloat16 if args.amp == "bf16" else torch.float32)
    print(f"device {bench.device_name(device)}, amp {args.amp}; measured {'bf16' if args.amp == 'bf16' else 'fp32'} "
          f"matmul peak {peak:.2f} TFLOP/s; medians of {args.repeats} alternating rounds x {args.iters} steps",
          flush=True)
    print(bench.HEADER, flush=True)
    results = []
    for name, row in rows.items():
        out = bench.bench_row(row["preset"], row["batch"], device, args.amp, baselines=not args.no_baselines,
                              tokenizer=args.tokenizer, compile=args.compile, warmup=args.warmup,
                              iters=args.iters, repeats=args.repeats, peak=peak, profile=args.profile)
        for r in out:
            r["row"] = name
            print(bench.format_result(f"{name} (batch {row['batch']})", r), flush=True)
        results += out
    report = {"matmul_peak_tflops": peak, "rows": results}
    if args.loop:
        loop = bench.loop_vs_step(bench.shipped_config("pretrain/fmnist.yaml"), device, args.loop, args.loop_rounds,
                                  compile=args.compile, amp=args.amp, warmup=args.warmup, overrides=args.loop_set)
        rounds = ", ".join(f"{lp:.1f}/{st:.1f}" for lp, st in zip(loop["rounds_loop_img_per_s"],
                                                                   loop["rounds_step_img_per_s"]))
        print(f"loop ({loop['config']}, {loop['num_workers']} worker(s)) vs step, {loop['rounds']} rounds of "
              f"{args.loop} steps each (img/s: {rounds}): median ratio {100 * loop['loop_over_step']:.1f}%", flush=True)
        report["loop"] = loop
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
