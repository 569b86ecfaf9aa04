"""One-shot GPU check of the pretraining step at BEiT-B/16 scale (at most --budget seconds on one GPU;
docs/results/gpu.md gives a measured run and how long it took).

    python scripts/gpu_check.py --out gpu_check.json [--compile] [--budget 480]
    python scripts/gpu_check.py --tiny --out /tmp/gpu_check.json      # CPU smoke version (tested in CI)

Sections, each timed with `beit.bench` (ours, HF and the tokenizer alone, alternating, medians):
  1. BEiT-B/16 MIM step + DALL-E tokenizer architecture (random weights), bf16, batch 64 and 256, vs HF
     `BeitForMaskedImageModeling` + the same tokenizer: img/s, step MFU (FLOPs counted; the spec-sheet
     dense peak and a matmul peak measured here), peak memory, tokenizer share of the step;
  2. the same step in fp16 with the dynamic loss scaler;
  3. FSDP2 on one GPU: the training loop's `dist.strategy=fsdp` wrapping (`fully_shard` per block and on
     the root, bf16 params / fp32 reduction) on a 1-process group;
  4. 20 s of the real Fashion-MNIST pretraining loop (data pipeline included) vs its step alone;
  5. with --compile: the batch-256 step with every block through torch.compile (compile time counted).
Every section runs in try/except (an error is recorded, the rest still runs), the table is printed as it
grows and the JSON is rewritten after each section. Sections that would overrun --budget are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from beit import bench  # noqa: E402
from beit.experiments.fashion_mnist import CONFIGS  # noqa: E402

BASE = "beit_base_patch16_224_8k_vocab"
# --tiny: the same code paths at a size a 2-core CPU runs in seconds (DALL-E encoder at 16 px).
TINY = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2)


def fsdp_wrap(device: torch.device):
    """Start a 1-process group and return `wrap(model)`: the training loop's FSDP2 wrapping
    (`beit.train.distributed.wrap_fsdp`: fully_shard each block, then the root; bf16 params, fp32 reduce)."""
    import torch.distributed as dist

    from beit.train.distributed import DistInfo, wrap_fsdp

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    info = DistInfo(device=device)
    return lambda model: wrap_fsdp(model, info, bf16=True)


def time_steps(builders: list, device, args, peak) -> list[dict]:
    """Build and time steps alternately; rows shaped like `bench.bench_row`'s."""
    name_steps = [bench.prepare(b, device, args.warmup) for b in builders]
    times = bench.time_alternating(name_steps, device, args.iters, args.repeats)
    spec, spec_name = bench.spec_peak_tflops(device)
    rows = []
    for s in name_steps:
        t = times[s.name]
        tflops = s.flops / t / 1e12
        rows.append({"impl": s.name, "batch": s.batch, "img_per_s": s.batch / t, "ms_per_step": t * 1e3,
                     "ours_speedup": None, "gflop_per_img": s.flops / s.batch / 1e9, "tflops": tflops,
                     "share_of_matmul_peak": tflops / peak if peak else None,
                     "mfu_spec": tflops / spec if spec else None, "spec_peak": spec_name,
                     "tokenizer_share": None, "peak_mem_gb": s.peak_mem_gb, **s.info})
    return rows


def sections(args, device, peak):
    """(name, estimated seconds, callable -> list of result rows) in run order."""
    kw = TINY if args.tiny else {}
    b_small, b_big = (1, 2) if args.tiny else (64, 256)
    row = dict(device=device, tokenizer="dall-e-random", warmup=args.warmup, iters=args.iters,
               repeats=args.repeats, peak=peak, **kw)

    def base(batch, amp="bf16", baselines=True):
        return lambda: bench.bench_row(BASE, batch, amp=amp, baselines=baselines, **row)

    def fsdp():
        tok = bench.build_tokenizer("dall-e-random", device)
        wrap = fsdp_wrap(device)

        def build():
            step = bench.ours_mim(BASE, b_small, device, "bf16", tok, wrap=wrap, **kw)
            step.name = "ours+fsdp"
            return step

        return time_steps([build], device, args, peak)

    def loop():
        fm = "beit_fmnist_patch4_32_512_vocab"
        # The config loads in process (best on 2 cores); a GPU host has cores to spare for loader workers.
        over = (["data.batch_size=16", "data.num_workers=0", "data.train_subset=512"] if args.tiny
                else ["data.num_workers=8"])
        over += [f"data.root={args.data_root}"] if args.data_root else []
        res = bench.run_loop(str(CONFIGS / "pretrain" / "fmnist.yaml"), device, seconds=args.loop_seconds,
                             overrides=over, skip=1 if args.tiny else 3)
        step = bench.bench_row(fm, res["batch"], device, baselines=False, warmup=args.warmup, iters=args.iters,
                               repeats=args.repeats, peak=peak)[0]
        return [step, {**res, "impl": "loop", "img_per_s": res["loop_img_per_s"],
                       "loop_over_step": res["loop_img_per_s"] / step["img_per_s"]}]

    def compiled():
        tok = bench.build_tokenizer("dall-e-random", device)
        t0 = time.perf_counter()

        def build():
            step = bench.ours_mim(BASE, b_big, device, "bf16", tok, compile=True, **kw)
            step.name = "ours+compile"
            return step

        rows = time_steps([build], device, args, peak)  # the warm-up steps include the compilation
        return [{**r, "with_compile_s": time.perf_counter() - t0} for r in rows]

    fp16_ok = device.type == "cuda" or args.tiny
    out = [(f"bf16 batch {b_small}", 40, base(b_small)), (f"bf16 batch {b_big}", 60, base(b_big))]
    if fp16_ok:
        out.append((f"fp16+scaler batch {b_big}", 30, base(b_big, "fp16", baselines=False)))
    out += [(f"fsdp bf16 batch {b_small}", 30, fsdp), ("fmnist loop", args.loop_seconds + 30, loop)]
    if args.compile:
        out.append((f"compile bf16 batch {b_big}", 150, compiled))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run of every section")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later sections are skipped past it")
    p.add_argument("--compile", action="store_true", help="also time the batch-256 step under torch.compile")
    p.add_argument("--loop-seconds", type=float, default=20.0)
    p.add_argument("--data-root", help="folder with the four Fashion-MNIST IDX .gz files (default: Debian's path)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.tiny:
        args.loop_seconds, args.warmup, args.iters, args.repeats = min(args.loop_seconds, 2.0), 0, 1, 1

    from beit.train.distributed import resolve_device

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    peak = bench.matmul_peak_tflops(device, seconds=0.3 if args.tiny else 2.0)
    spec, spec_name = bench.spec_peak_tflops(device)
    report = {"device": bench.device_name(device), "torch": torch.__version__, "tiny": args.tiny,
              "matmul_peak_tflops_bf16_measured": peak, "spec_peak_tflops": spec, "spec_peak": spec_name,
              "sections": {}, "errors": {}, "skipped": []}
    print(f"{report['device']}, torch {torch.__version__}; bf16 matmul peak measured {peak:.1f} TFLOP/s"
          + (f", {spec_name} {spec:.0f} TFLOP/s" if spec else "") + f"; budget {args.budget:.0f} s", flush=True)
    print(bench.HEADER, flush=True)
    for name, est, fn in sections(args, device, peak):
        elapsed = time.perf_counter() - t_start
        if elapsed + est > args.budget:
            report["skipped"].append(name)
            print(f"{name:<34} skipped: {elapsed:.0f} s used, ~{est} s needed, budget {args.budget:.0f} s", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            rows = fn()
            for r in rows:
                if r["impl"] == "loop":
                    print(f"{name:<34} loop         {r['img_per_s']:>8.1f}  ({100 * r['loop_over_step']:.0f}% of the "
                          f"step alone, {r['steps_timed']} steps, {r['num_workers']} worker(s))", flush=True)
                else:
                    print(bench.format_result(name, r), flush=True)
            report["sections"][name] = {"seconds": time.perf_counter() - t0, "rows": rows}
        except Exception as e:  # record and go on: one failure must not lose the other numbers
            report["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name:<34} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(file=sys.stdout)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    report["total_seconds"] = time.perf_counter() - t_start
    args.out.write_text(json.dumps(report, indent=2))
    print(f"total {report['total_seconds']:.0f} s; {len(report['errors'])} error(s); JSON: {args.out}", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
