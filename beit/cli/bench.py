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
    p.add_argument("--row", choices=[*ROWS, "all", "none"], default="all",
                   help="a standard comparison row (none: only --loop / --data-items)")
    p.add_argument("--preset", help="any model preset instead of --row (a *_vocab preset times pretraining)")
    p.add_argument("--batch", type=int, help="batch size (default: the row's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="as train.amp (auto: bf16 where the hardware runs it natively, else fp32)")
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
    p.add_argument("--compile-scopes", nargs="*", choices=["eager", "blocks", "model", "step"], metavar="SCOPE",
                   help="instead of the comparison, time our pretraining step with torch.compile over each SCOPE "
                        "(eager, blocks, model, step; default all four), alternating; --row all: the MIM rows")
    p.add_argument("--data-items", type=int, metavar="N", help="also time the Fashion-MNIST pretraining data "
                                                               "pipeline: CPU ms per item over N items, no loader "
                                                               "(with --loop-set's overrides)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of our step's top operators")
    p.add_argument("--json", type=Path, metavar="PATH", help="write all results as JSON")
    p.set_defaults(func=run)


def run(args):
    import torch

    from beit import bench
    from beit.experiments.fashion_mnist import CONFIGS
    from beit.train.distributed import resolve_device
    from beit.train.loop import resolve_amp

    device = resolve_device(args.device)
    args.amp = resolve_amp(args.amp, device)
    if args.amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 needs a CUDA device (the loss scaler); use --amp bf16 on CPU")
    report = {}
    rows = select_rows(args)
    if rows:
        peak = bench.matmul_peak_tflops(device, torch.bfloat16 if args.amp == "bf16" else torch.float32)
        print(f"device {bench.device_name(device)}, amp {args.amp}; measured {'bf16' if args.amp == 'bf16' else 'fp32'} "
              f"matmul peak {peak:.2f} TFLOP/s; medians of {args.repeats} alternating rounds x {args.iters} steps",
              flush=True)
        report = {"matmul_peak_tflops": peak, "rows": time_rows(args, rows, device, peak)}
    config = str(CONFIGS / "pretrain" / "fmnist.yaml")  # the Fashion-MNIST reproduction's pretraining
    if args.loop:
        report["loop"] = time_loop(args, config, device)
    if args.data_items:
        items = bench.data_item_cost(config, args.data_items, args.loop_set)
        print(f"data ({items['config']}): {items['cpu_ms_per_item']:.3f} ms of CPU per item ({items['items']} items)",
              flush=True)
        report["data"] = items
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


def select_rows(args) -> dict:
    """The rows to time: --preset, or the named standard row(s), with --batch applied."""
    if args.preset:
        return {args.preset: dict(preset=args.preset, batch=args.batch or 32, title=args.preset)}
    names = {"all": list(ROWS), "none": []}.get(args.row, [args.row])
    if args.compile_scopes is not None and args.row == "all":
        names = [n for n in names if n.endswith("-mim")]  # compile scopes time the pretraining step
    return {n: {**ROWS[n], **({"batch": args.batch} if args.batch else {})} for n in names}


def time_rows(args, rows: dict, device, peak: float) -> list[dict]:
    from beit import bench

    scopes = tuple(args.compile_scopes or bench.COMPILE_SCOPES) if args.compile_scopes is not None else None
    if scopes is None:
        print(bench.HEADER, flush=True)
    results = []
    for name, row in rows.items():
        label = f"{name} (batch {row['batch']})"
        if scopes is not None:
            out = bench.compile_scope_rows(row["preset"], row["batch"], device, args.amp, scopes=scopes,
                                           tokenizer=args.tokenizer, warmup=args.warmup, iters=args.iters,
                                           repeats=args.repeats)
            lines = [bench.format_scope(label, r, scopes[0]) for r in out]
        else:
            out = bench.bench_row(row["preset"], row["batch"], device, args.amp, baselines=not args.no_baselines,
                                  tokenizer=args.tokenizer, compile=args.compile, warmup=args.warmup,
                                  iters=args.iters, repeats=args.repeats, peak=peak, profile=args.profile)
            lines = [bench.format_result(label, r) for r in out]
        for r, line in zip(out, lines):
            r["row"] = name
            print(line, flush=True)
        results += out
    return results


def time_loop(args, config: str, device) -> dict:
    from beit import bench

    loop = bench.loop_vs_step(config, device, args.loop, args.loop_rounds, compile=args.compile, amp=args.amp,
                              warmup=args.warmup, overrides=args.loop_set)
    rounds = ", ".join(f"{lp:.1f}/{st:.1f}" for lp, st in zip(loop["rounds_loop_img_per_s"],
                                                               loop["rounds_step_img_per_s"]))
    print(f"loop ({loop['config']}, {loop['num_workers']} worker(s)) vs step, {loop['rounds']} rounds of "
          f"{args.loop} steps each (img/s: {rounds}): median ratio {100 * loop['loop_over_step']:.1f}%", flush=True)
    return loop
