"""`beit convert SRC DST --to official|hf|mmpretrain`: the source layout is detected from its keys.

`register(subparsers)` adds the sub-command; `beit/cli/__init__.py` wires it in.
"""

from __future__ import annotations

import argparse

# beit.convert.LAYOUTS, spelled out so that building the parser (`beit --help`) does not import torch;
# tests/test_convert.py checks that the two agree.
LAYOUTS = ("official", "hf", "mmpretrain")


def run_convert(args: argparse.Namespace) -> int:
    from beit.convert import detect_layout, read_checkpoint, save_checkpoint_as, to_official, unwrap_state_dict
    from beit.convert.segmentation import convert_segmenter, detect_seg_layout

    sd = unwrap_state_dict(read_checkpoint(args.src))
    if detect_seg_layout(sd) is not None:  # BEiT + UperNet: official = the mmseg ADE20K layout
        indices = [int(i) for i in args.out_indices.split(",")] if args.out_indices else None
        layout, out = convert_segmenter(args.src, args.dst, args.to, indices)
        print(f"converted segmenter {args.src} ({layout}, {len(sd)} tensors) -> {out} ({args.to})")
        return 0
    src_layout = detect_layout(sd)
    out = save_checkpoint_as(to_official(sd, src_layout), args.dst, args.to)
    print(f"converted {args.src} ({src_layout}, {len(sd)} tensors) -> {out} ({args.to})")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between official/timm, HF transformers and OpenMMLab layouts",
        description="Convert a BEiT checkpoint. The source layout (official/timm/ours, HF, OpenMMLab) is "
        "detected from its keys. DST ending in .safetensors or .pth picks the file format; for --to hf "
        "any other DST is a directory with model.safetensors + config.json (from_pretrained-ready).",
    )
    p.add_argument("src", help="checkpoint file (.pth/.pt/.bin/.safetensors) or HF directory")
    p.add_argument("dst", help="output file or (hf) directory")
    p.add_argument("--to", required=True, choices=LAYOUTS, help="target layout (a segmenter: official = the "
                   "official mmseg ADE20K layout, or hf)")
    p.add_argument("--out-indices", default=None, help="segmenter only: 0-based feature blocks, e.g. 3,5,7,11, "
                   "when the checkpoint does not carry its model config")
    p.set_defaults(func=run_convert)
    return p

