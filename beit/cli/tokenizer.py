"""`beit tokenizer {train, encode, reconstruct, convert}`; `register(subparsers)` adds the command group.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from beit.tasks import TASKS

# torch is imported inside the commands: building the parser (`beit --help`) must stay light.
TRAIN = TASKS["tokenizer"]  # `beit tokenizer train`


def _size(args, tok) -> int | None:
    """--size, else the size a trained tokenizer was trained at (32 for fmnist_dvae), else None (the images')."""
    return args.size or getattr(getattr(tok, "cfg", None), "image_size", None)


def _tokenizer(args):
    from beit.builders import create_tokenizer

    return create_tokenizer(args.tokenizer, weights=args.weights)


def cmd_train(args) -> int:
    cfg = TRAIN.read_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.train.out_dir) / (cfg.train.run_name or Path(args.config).stem)
    metrics = TRAIN.runner(cfg, out, overwrite=args.overwrite, resume=args.resume)
    if not metrics:  # not the main process
        return 0
    print(f"wrote {out} (codes used {metrics['codes_used_frac']:.1%}, perplexity {metrics['perplexity']:.1f}, "
          f"recon MSE {metrics['recon_mse']:.4f})")
    return 0


def cmd_encode(args) -> int:
    import torch

    from beit.data.datasets import load_image_files

    tok = _tokenizer(args)
    ids = tok.encode(load_image_files(args.images, tok.in_chans, _size(args, tok), tok.downsample))  # [B, h, w]
    if args.out:
        torch.save({"ids": ids, "images": args.images}, args.out)
        print(f"wrote token maps {tuple(ids.shape)} to {args.out}")
    for path, grid in zip(args.images, ids):
        print(f"# {path}: {grid.shape[0]}x{grid.shape[1]} tokens")
        for row in grid.tolist():
            print(" ".join(f"{t:4d}" for t in row))
    return 0


def cmd_reconstruct(args) -> int:
    import torch
    from torchvision.utils import save_image

    from beit.data.datasets import load_image_files

    tok = _tokenizer(args)
    x = load_image_files(args.images, tok.in_chans, _size(args, tok), tok.downsample)
    rec = tok.decode(tok.encode(x))
    pairs = torch.stack([x, rec], 1).flatten(0, 1)  # original, reconstruction, original, ...
    save_image(pairs, args.out, nrow=2, padding=2, pad_value=0.5)
    print(f"wrote {args.out} (pairs original | reconstruction)")
    return 0


def cmd_convert(args) -> int:
    from beit.builders import convert_dalle_pickle

    dst = convert_dalle_pickle(args.src, args.dst, trust_pickle=args.trust_pickle)
    print(f"wrote {dst}; load it with create_tokenizer('dall-e', weights='{dst}')")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `tokenizer` and its sub-commands to an argparse sub-parser set. Each sets `func(args) -> int`."""
    p = subparsers.add_parser("tokenizer", help="train, apply and convert visual tokenizers")
    sub = p.add_subparsers(dest="tokenizer_cmd", required=True)

    t = sub.add_parser(TRAIN.words[-1], help=TRAIN.help)
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    t.add_argument("--out", help="output directory (default: train.out_dir/run_name)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty directory")
    t.add_argument("--resume", action="store_true", help="continue the run in the output directory from its newest checkpoint")
    t.set_defaults(func=cmd_train)

    for name, fn, helptext in (("encode", cmd_encode, "print (and optionally save) token maps"),
                               ("reconstruct", cmd_reconstruct, "encode then decode, save a PNG grid")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--tokenizer", required=True, help="'dall-e', a shipped name (fmnist_dvae) or a trained tokenizer path")
        e.add_argument("--weights", help="weight file (required for dall-e)")
        e.add_argument("images", nargs="+")
        e.add_argument("--size", type=int, help="resize images to SIZE x SIZE (default: the tokenizer's training size)")
        e.add_argument("--out", required=name == "reconstruct", help="output file (.pt for encode, .png for reconstruct)")
        e.set_defaults(func=fn)

    c = sub.add_parser("convert", help="convert OpenAI's pickled encoder.pkl/decoder.pkl to safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--trust-pickle", action="store_true", help="required: unpickling runs code from the file")
    c.set_defaults(func=cmd_convert)
    return p

