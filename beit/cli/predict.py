"""`beit predict SOURCE [key=value ...]`: argument parsing only; the pictures are drawn by beit/visualize.py."""

from __future__ import annotations

import argparse

from beit.cli.docs import module_doc


def register(subparsers):
    p = subparsers.add_parser("predict", help="draw what a model predicts: masked tokens (pretraining) or "
                              "label maps (segmentation), as a PNG",
                              description=module_doc("beit.visualize"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the pretraining or segmentation checkpoint (run directory, ckpt-*.pt, exported "
                   "folder) or a config with model.pretrained")
    p.add_argument("overrides", nargs="*", help="e.g. model.pretrained=runs/fmnist")
    p.add_argument("--out", default="predictions.png")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--attention", action="store_true",
                   help="instead: per head, where the last block's [CLS] token attends (rel-pos bias included)")
    p.set_defaults(func=run_predict)


def run_predict(a) -> int:
    from beit.hub import command_config
    from beit.visualize import predict

    print(predict(command_config(a.config, a.overrides, "predict"), a.out, a.num, a.attention))
    return 0
