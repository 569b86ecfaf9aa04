"""Does a refactor change what training does? Run the same short runs on two commits and compare metrics.jsonl.

    OMP_NUM_THREADS=1 python scripts/behaviour_check.py --ref 0be7afa            # REF vs HEAD
    OMP_NUM_THREADS=1 python scripts/behaviour_check.py --ref 0be7afa --new WORKTREE   # vs uncommitted files

Each tree is a `git archive` of its commit (or the folder given as --new), run with this interpreter and
PYTHONPATH set to that tree, so both use the same installed dependencies. Four short runs on the Fashion-MNIST
IDX files (`make data`): pretraining, fine-tuning from the shipped backbone, segmentation of Fashion-MNIST
scenes, and tokenizer training. Every metrics.jsonl row must be equal, key by key, once the clock-dependent
keys (wall times, images per second, data wait) are dropped. Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This checkout's file by absolute path, so both trees fine-tune the same weights (older trees know no zoo names,
# and the file behind a name can change between commits).
BACKBONE = f"model.pretrained={ROOT}/beit/assets/fmnist_backbone.safetensors"
COMMON = ["train.max_steps=12", "train.log_every=2", "train.progress=false", "data.num_workers=0",
          "train.compile=false", "train.save_every_steps=1000"]
RUNS = {  # name -> beit arguments (the output folder is appended by `command`)
    "pretrain": ["pretrain", "configs/pretrain/fmnist.yaml", *COMMON],
    "finetune": ["finetune", "configs/finetune/fmnist.yaml", BACKBONE, "data.val_size=5000",
                 "train.eval_split=val", "train.export=[]", *COMMON],
    "segment": ["segment", "configs/segment/fmnist_scenes.yaml", BACKBONE,
                "seg.scenes=[256,64]", "train.export=[]", *COMMON],
    "tokenizer": ["tokenizer", "train", "configs/tokenizer/fmnist_dvae.yaml", *COMMON],
}
CLOCK_WORDS = ("time", "per_s", "wait")  # keys whose values depend on the machine's speed, not on the run


def command(name: str, out: Path) -> list[str]:
    args = list(RUNS[name])
    if name == "tokenizer":
        return [*args, "--out", str(out / name)]
    return [*args, f"train.out_dir={out}", f"train.run_name={name}"]


def checkout(ref: str, dest: Path) -> Path:
    """The files of commit `ref` in `dest` (no .git: nothing there can touch this repository)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="tar")
    return dest


def run_all(tree: Path, out: Path, names: list[str]) -> dict[str, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    rows = {}
    for name in names:
        cmd = [sys.executable, "-m", "beit", *command(name, out)]
        print(f"[{tree.name}] {' '.join(cmd[2:])}", flush=True)
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} failed in {tree} (rc {done.returncode}):\n{done.stderr[-3000:]}")
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [strip_clock(json.loads(line)) for line in lines]
    return rows


def strip_clock(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(w in k for w in CLOCK_WORDS)}


def compare(old: list[dict], new: list[dict]) -> list[str]:
    """The differences between two runs' rows, as readable lines ([] when equal)."""
    diffs = [f"{len(old)} rows before, {len(new)} after"] if len(old) != len(new) else []
    for i, (a, b) in enumerate(zip(old, new)):
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                diffs.append(f"row {i} {key}: {a.get(key, '<absent>')} -> {b.get(key, '<absent>')}")
    return diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the commit before the change")
    p.add_argument("--new", default="HEAD", help="the commit after it (default HEAD), or a folder holding a tree")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--report", type=Path, default=None, help="also write the comparison here as JSON")
    a = p.parse_args()
    names = a.runs.split(",")
    if unknown := set(names) - set(RUNS):
        p.error(f"--runs: unknown {sorted(unknown)}; choose from {list(RUNS)}")
    with tempfile.TemporaryDirectory(prefix="beit-behaviour-") as tmp:
        tmp = Path(tmp)
        old_tree = checkout(a.ref, tmp / "before")
        new_tree = Path(a.new).resolve() if Path(a.new).is_dir() else checkout(a.new, tmp / "after")
        old = run_all(old_tree, tmp / "out-before", names)
        new = run_all(new_tree, tmp / "out-after", names)
    report = {name: {"rows": len(new[name]), "keys": sorted(new[name][0]) if new[name] else [],
                     "differences": compare(old[name], new[name])} for name in names}
    for name, r in report.items():
        verdict = "identical" if not r["differences"] else f"{len(r['differences'])} differences"
        print(f"{name:10s} {r['rows']:3d} rows, {len(r['keys'])} keys compared: {verdict}")
        for line in r["differences"][:10]:
            print(f"    {line}")
    if a.report:
        a.report.write_text(json.dumps({"ref": a.ref, "new": a.new, "runs": report}, indent=1) + "\n")
    return 1 if any(r["differences"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
