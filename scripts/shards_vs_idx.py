"""Pretraining from tar shards vs from the IDX files: the same recipe, two data paths, two loss curves.

    OMP_NUM_THREADS=2 python scripts/shards_vs_idx.py [--steps 200] [--out runs/shards_vs_idx] [--only idx|shards]

(`--only` runs one variant, e.g. both at once in two processes; a final call without it compares them.)

Writes Fashion-MNIST's training split as shards (`beit data shard`, 6000 images per shard), then runs
configs/pretrain/fmnist_quick.yaml for `--steps` steps with data.num_workers=0 from the IDX reader and from
the shards (data.dataset=webdataset), and prints both curves and their gap. Both paths draw a sample's
views and mask from (seed, epoch, sample index); only the order in which samples arrive differs (a
permutation of all 60k for IDX, a shard permutation plus a 2000-sample buffer for shards).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from beit.config import load_config
from beit.train.metrics import read_metrics
from beit.train.pretrain import run_pretrain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="runs/shards_vs_idx")
    p.add_argument("--config", default="configs/pretrain/fmnist_quick.yaml")
    p.add_argument("--only", choices=["idx", "shards"], help="run this variant only, compare nothing")
    args = p.parse_args()
    out = Path(args.out)
    shards = out / "fmnist-shards"  # not a run name: a run directory may be replaced (--overwrite)
    if not (shards / "shards.json").is_file():
        subprocess.run([sys.executable, "-m", "beit", "data", "shard", "/usr/share/datasets/fashion-mnist",
                        str(shards), "--images-per-shard", "6000"], check=True)
    common = ["data.num_workers=0", f"train.max_steps={args.steps}", f"train.out_dir={out}", "train.progress=false"]
    variants = {"idx": [], "shards": ["data.dataset=webdataset", f"data.shards={shards.resolve()}/train-{{000000..000009}}.tar"]}
    curves = {}
    for name, extra in variants.items():
        run_dir = out / name
        if args.only not in (None, name):
            continue
        if not (run_dir / "summary.json").is_file():
            run_pretrain(load_config(args.config, [*common, *extra, f"train.run_name={name}"]), overwrite=True)
        if args.only:
            return
        rows = read_metrics(run_dir / "metrics.jsonl", "train")
        curves[name] = {r["step"]: (r["loss"], r["mlm_acc"]) for r in rows}
    print(f"{'step':>5} {'idx loss':>9} {'shard loss':>10} {'gap':>7} {'idx acc':>8} {'shard acc':>9}")
    gaps = []
    for step in sorted(set(curves["idx"]) & set(curves["shards"])):
        (la, aa), (lb, ab) = curves["idx"][step], curves["shards"][step]
        gaps.append(lb - la)
        print(f"{step:5d} {la:9.4f} {lb:10.4f} {lb - la:+7.4f} {aa:8.4f} {ab:9.4f}")
    summary = {"steps": args.steps, "mean_gap": sum(gaps) / len(gaps), "max_abs_gap": max(map(abs, gaps)),
               "final": {k: v[max(v)] for k, v in curves.items()}}
    print(json.dumps(summary))
    (out / "comparison.json").write_text(json.dumps({"curves": curves, **summary}, indent=1))


if __name__ == "__main__":
    main()
