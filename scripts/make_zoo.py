"""Write the shipped Fashion-MNIST models (beit/assets/fmnist_{backbone,classifier}.safetensors) from two runs.

    OMP_NUM_THREADS=2 python scripts/make_zoo.py --pretrain runs/reproduce_fmnist_full/pretrain \\
        --finetune runs/reproduce_fmnist_full/finetune_pt_100 [--out beit/assets]

Each file holds the run's final weights in fp16 (official key layout) and, in its safetensors metadata, the
run's config (`beit_config`) and class names, so `beit.load("fmnist-classifier")` and
`beit.create_model("beit_fmnist_patch4_32", pretrained="fmnist")` rebuild them with nothing restated.
Then the classifier file is evaluated with `beit eval` on the full Fashion-MNIST test split and its top-1
printed: that number goes into docs/model_zoo.md (tests/test_zoo.py checks it within 0.1 pp).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

MAX_BYTES = 6 * 1024 * 1024
FILES = {"pretrain": "fmnist_backbone.safetensors", "finetune": "fmnist_classifier.safetensors"}


def write_asset(run: str, out: Path, want_kind: str) -> Path:
    from safetensors.torch import save_file

    from beit.convert import to_official, unwrap_state_dict
    from beit.hub import model_kind, read_source

    src = read_source(run)
    if src.inferred:
        raise SystemExit(f"{run}: not a beit run or training checkpoint (no stored config)")
    sd = to_official(unwrap_state_dict(src.raw))
    if model_kind(sd) != want_kind:
        raise SystemExit(f"{run}: holds a {model_kind(sd)} checkpoint, expected a {want_kind}")
    from beit.tokenizers import SHIPPED

    if want_kind == "mim" and src.config.tokenizer.name not in SHIPPED:
        raise SystemExit(f"{run}: pretrained against tokenizer '{src.config.tokenizer.name}', which is not shipped "
                         f"({', '.join(SHIPPED)}); users could not rebuild its targets")
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}
    meta = {"format": "pt", "beit_config": json.dumps(src.config.to_dict()),
            "class_names": json.dumps(src.class_names), "source": str(src.path)}
    save_file(half, str(out), metadata=meta)
    size = out.stat().st_size
    if size > MAX_BYTES:
        out.unlink()
        raise SystemExit(f"{out}: {size / 2**20:.1f} MiB is over the 6 MiB budget")
    print(f"wrote {out} ({size / 2**20:.2f} MiB, {len(half)} tensors, from {src.path})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", required=True, help="pretraining run directory (or checkpoint)")
    p.add_argument("--finetune", required=True, help="100%%-label fine-tuning run directory (or checkpoint)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "beit" / "assets"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_asset(args.pretrain, out / FILES["pretrain"], "mim")
    classifier = write_asset(args.finetune, out / FILES["finetune"], "classifier")

    from beit.hub import command_config
    from beit.train.evaluate import run_eval

    with tempfile.TemporaryDirectory() as tmp:
        cfg = command_config(str(classifier), [f"train.out_dir={tmp}", "train.run_name=zoo_eval",
                                               "data.eval_subset=null", "data.num_workers=0"], "eval")
        res = json.loads((run_eval(cfg) / "results.json").read_text())
    print(f"beit eval {classifier.name}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
          f"({res['num_samples']} Fashion-MNIST test images) -> put the top-1 into docs/model_zoo.md")


if __name__ == "__main__":
    main()
