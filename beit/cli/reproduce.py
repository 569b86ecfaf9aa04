"""`beit reproduce fashion-mnist|fmnist-scenes` and `beit demo`: argument parsing only; the drivers are
beit/experiments/fashion_mnist.py and beit/experiments/fmnist_scenes.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from beit.cli.docs import module_doc


def register(subparsers):
    p = subparsers.add_parser("reproduce", help="reproduce the paper's claim on Fashion-MNIST (resumable)",
                              description=module_doc("beit.experiments.fashion_mnist"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["fashion-mnist", "fmnist-scenes"],
                   help="fashion-mnist: classification; fmnist-scenes: segmentation (beit/experiments/fmnist_scenes.py)")
    p.add_argument("--variant", choices=["quick", "full", "gpu", "smoke"], default="full",
                   help="quick: ~13 min on a 2-core CPU; full: ~2 h 11 min on it (measured: "
                        "docs/results/fashion_mnist.md); gpu: a larger one-GPU budget; "
                        "fmnist-scenes has full and smoke (a one-minute check of the driver)")
    p.add_argument("--pretrained", default=None,
                   help="fmnist-scenes: an existing Fashion-MNIST pretraining run directory (else it is run)")
    p.add_argument("--quick", action="store_const", const="quick", dest="variant", help="same as --variant quick")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce_fmnist_<variant>)")
    p.add_argument("--retrain-tokenizer", action="store_true", help="train the dVAE tokenizer instead of the shipped one")
    p.add_argument("--report-only", action="store_true", help="run nothing; tabulate the stages finished so far")
    p.add_argument("--stages", default=None, type=lambda s: s.split(","),
                   help="fashion-mnist: run only these stages (comma-separated run names, e.g. "
                        "pretrain,finetune_pretrained_100pct_seed0); the rest run on a later call")
    p.set_defaults(func=_dispatch)

    d = subparsers.add_parser("demo", help="the first ten minutes: pretrain + fine-tune a small BEiT on CPU")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--minutes", type=float, default=9,
                   help="time budget: on a machine too slow for the standard demo (312 pretraining steps, 2 x 92 "
                        "fine-tuning steps; ~8 min on a 2-core CPU with bf16), every training run is shortened by "
                        "one factor to fit it; 0: no budget. Set by the first call: a rerun resumes that plan")
    d.set_defaults(func=_demo)


def _demo(a) -> int:
    from beit.experiments import fashion_mnist

    return fashion_mnist.demo(Path(a.out), a.minutes)


def _dispatch(a) -> int:
    from beit.experiments import fashion_mnist
    from beit.experiments.fmnist_scenes import SCENE_VARIANTS, reproduce_scenes

    if a.dataset == "fmnist-scenes":
        if a.stages:
            raise ValueError("--stages is for fashion-mnist; fmnist-scenes always runs its pair of stages")
        if a.variant not in SCENE_VARIANTS:
            raise ValueError(f"--variant {a.variant}: fmnist-scenes has {', '.join(SCENE_VARIANTS)}")
        reproduce_scenes(Path(a.out or f"runs/reproduce_scenes_{a.variant}"), a.variant, a.pretrained, a.report_only)
        return 0
    if a.variant not in fashion_mnist.VARIANTS or a.pretrained:
        raise ValueError(f"fashion-mnist: --variant is one of {', '.join(fashion_mnist.VARIANTS)}; --pretrained is for fmnist-scenes")
    out = Path(a.out or f"runs/reproduce_fmnist_{a.variant}")
    if a.report_only:
        fashion_mnist.report(out, a.variant, a.retrain_tokenizer)
    else:
        fashion_mnist.reproduce(out, a.variant, a.retrain_tokenizer, a.stages)
    return 0
