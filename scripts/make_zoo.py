"""Write the shipped Fashion-MNIST models (beit/assets/fmnist_*.safetensors) from training runs.

    OMP_NUM_THREADS=2 python scripts/make_zoo.py --pretrain runs/fmnist_pretrain_20ep \\
        --pretrain-4ep runs/reproduce_fmnist_full/pretrain \\
        --finetune runs/study_fmnist_20ep_full/100pct_pretrained_lr0.002_ld0.75_seed0

writes `fmnist-backbone` (--pretrain), `fmnist-backbone-4ep` (--pretrain-4ep, the shorter pretraining that
earlier results start from) and `fmnist-classifier` (--finetune). Each option is optional: a file not asked
for is left as it is. Each file holds the run's final weights in fp16 (official key layout) and, in its
safetensors metadata, the run's config (`beit_config`) and class names, so `beit.load("fmnist-classifier")` and
`beit.create_model("beit_fmnist_patch4_32", pretrained="fmnist")` rebuild them with nothing restated.
Then the classifier file is evaluated with `beit eval` on the full Fashion-MNIST test split; its top-1, top-5
and the files' sizes are printed and written to --json (docs/results/model_zoo.json), from which
docs/model_zoo.md's numbers are rendered (scripts/render_docs.py; tests/test_zoo.py checks the top-1 within
0.1 pp). To measure the shipped files again without rewriting them:

    OMP_NUM_THREADS=2 python scripts/make_zoo.py --eval-only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

MAX_BYTES = 6 * 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
# option -> (zoo name, the kind of checkpoint it must hold); the file names are beit.hub.ZOO's
FILES = {"pretrain": ("fmnist-backbone", "mim"), "finetune": ("fmnist-classifier", "classifier"),
         "pretrain_4ep": ("fmnist-backbone-4ep", "mim")}


def write_asset(run: str, out: Path, want_kind: str) -> Path:
    from beit.convert import to_official, unwrap_state_dict, write_weights
    from beit.hub import model_kind, read_source

    src = read_source(run)
    if src.inferred:
        raise SystemExit(f"{run}: not a beit run or training checkpoint (no stored config)")
    sd = to_official(unwrap_state_dict(src.raw))
    if model_kind(sd) != want_kind:
        raise SystemExit(f"{run}: holds a {model_kind(sd)} checkpoint, expected a {want_kind}")
    from beit.builders import SHIPPED_TOKENIZERS

    if want_kind == "mim" and src.config.tokenizer.name not in SHIPPED_TOKENIZERS:
        raise SystemExit(f"{run}: pretrained against tokenizer '{src.config.tokenizer.name}', which is not shipped "
                         f"({', '.join(SHIPPED_TOKENIZERS)}); users could not rebuild its targets")
    half = {k: v.to(torch.float16) for k, v in sd.items()}
    meta = {"beit_config": json.dumps(src.config.to_dict()), "class_names": json.dumps(src.class_names),
            "source": str(src.path)}
    write_weights(half, out, metadata=meta)
    size = out.stat().st_size
    if size > MAX_BYTES:
        out.unlink()
        raise SystemExit(f"{out}: {size / 2**20:.1f} MiB is over the 6 MiB budget")
    print(f"wrote {out} ({size / 2**20:.2f} MiB, {len(half)} tensors, from {src.path})")
    return out


def evaluate(classifier: Path) -> dict:
    """`beit eval` of the classifier file on the full Fashion-MNIST test split."""
    from beit.hub import command_config
    from beit.train.eval_task import run_eval

    with tempfile.TemporaryDirectory() as tmp:
        cfg = command_config(str(classifier), [f"train.out_dir={tmp}", "train.run_name=zoo_eval",
                                               "data.eval_subset=null", "data.num_workers=0"], "eval")
        return json.loads((run_eval(cfg) / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", help="pretraining run directory (or checkpoint) for fmnist-backbone")
    p.add_argument("--finetune", help="fine-tuning run directory (or checkpoint) for fmnist-classifier")
    p.add_argument("--pretrain-4ep", help="pretraining run directory (or checkpoint) for fmnist-backbone-4ep")
    p.add_argument("--out", default=str(ROOT / "beit" / "assets"))
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "model_zoo.json"),
                   help="where the measured numbers go (default docs/results/model_zoo.json)")
    p.add_argument("--eval-only", action="store_true", help="write nothing to --out; evaluate the files there")
    args = p.parse_args()
    out = Path(args.out)
    runs = {opt: getattr(args, opt) for opt in FILES if getattr(args, opt)}
    if bool(runs) == args.eval_only:
        p.error("give --pretrain, --finetune and/or --pretrain-4ep, or --eval-only (not both)")
    out.mkdir(parents=True, exist_ok=True)
    from beit.hub import ZOO

    files = {name: ZOO[name].name for name, _ in FILES.values()}
    for opt, run in runs.items():
        name, kind = FILES[opt]
        write_asset(run, out / files[name], kind)
    classifier = out / files["fmnist-classifier"]
    res = evaluate(classifier)
    record = {"command": "python scripts/make_zoo.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
              "files": {name: {"file": f, "size_mib": (out / f).stat().st_size / 2**20}
                        for name, f in files.items() if (out / f).is_file()},
              "classifier_eval": {k: res[k] for k in ("top1", "top5", "num_samples")}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"beit eval {classifier.name}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
          f"({res['num_samples']} Fashion-MNIST test images) -> {args.json}; "
          f"then python scripts/render_docs.py writes it into docs/model_zoo.md")


if __name__ == "__main__":
    main()
