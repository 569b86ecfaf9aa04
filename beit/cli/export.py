"""`beit export SRC DST --to hf|timm`: argument parsing only; the writers are in beit/export.py."""

from __future__ import annotations

import argparse

# beit.export.FORMATS, spelled out so that building the parser (`beit --help`) does not import torch;
# tests/test_config.py checks that the two agree.
FORMATS = ("hf", "timm")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a checkpoint as an HF transformers or timm folder that loads unchanged",
        description="`beit export SRC DIR --to hf|timm`: a folder other libraries load unchanged. SRC is a run "
        "directory, ckpt-*.pt / best.pt, shipped name or any supported checkpoint; its stored config describes the "
        "model (nothing to restate).")
    p.add_argument("src", help="run directory, checkpoint file, exported folder or shipped model name")
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=run_export)
    return p


def run_export(a) -> int:
    from beit.export import export

    out = export(a.src, a.dst, a.to, overwrite=a.overwrite)
    print(f"exported {a.src} -> {out} ({a.to})")
    return 0
