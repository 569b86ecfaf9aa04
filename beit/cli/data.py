"""`beit data shard SRC OUT --images-per-shard N`: write tar shards (WebDataset format) from any dataset
`beit` reads, for `data.dataset: webdataset`. `register(subparsers)` adds the command group (kept outside
beit/data so that `beit --help` does not import the data stack)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_shard(args) -> int:
    from beit.data.build import shard_source
    from beit.data.shards import write_shards

    ds, classes, name = shard_source(args.src, args.dataset, args.split, args.in_chans)
    out = Path(args.out)
    written = write_shards(ds, out, args.split, args.images_per_shard, classes,
                           shuffle_seed=None if args.no_shuffle else args.seed, overwrite=args.overwrite)
    last = len(written) - 1
    print(f"wrote {sum(written.values())} {name} '{args.split}' samples ({len(classes)} classes) as {len(written)} "
          f"shards in {out} (sample counts: {out / 'shards.json'})")
    key = "data.shards" if args.split == "train" else "data.eval_shards"
    print(f"use: data.dataset=webdataset {key}='{out.resolve()}/{args.split}-{{000000..{last:06d}}}.tar'")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="prepare datasets (tar shards for streaming)")
    sub = p.add_subparsers(dest="data_cmd", required=True)
    s = sub.add_parser("shard", help="write a dataset as tar shards with a sample-count index",
                       description="Write SRC (an ImageFolder root, a folder with Fashion-MNIST's IDX files, or "
                                   "a CIFAR root with --dataset) as OUT/<split>-NNNNNN.tar plus OUT/shards.json.")
    s.add_argument("src", help="data root, as data.root would name it")
    s.add_argument("out", help="output directory")
    s.add_argument("--images-per-shard", type=int, default=10_000, help="samples per shard (default 10000)")
    s.add_argument("--dataset", help="how to read SRC, any data.dataset but webdataset (default: fashion_mnist if "
                                     "it holds Fashion-MNIST's IDX files, else image_folder)")
    s.add_argument("--split", choices=["train", "test"], default="train")
    s.add_argument("--in-chans", type=int, choices=[1, 3], help="channels of the PNGs written for in-memory "
                   "datasets (default: 1 for Fashion-MNIST, else 3); ImageFolder files are copied as they are")
    s.add_argument("--seed", type=int, default=0, help="seed of the order samples are written in")
    s.add_argument("--no-shuffle", action="store_true", help="keep the source order (ImageFolder: class by class)")
    s.add_argument("--overwrite", action="store_true", help="replace existing OUT/<split>-*.tar shards")
    s.set_defaults(func=cmd_shard)
    return p
