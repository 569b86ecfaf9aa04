"""CPU time per pretraining item: the data pipeline's cost, without the loader around it.

Builds the pretraining dataset of a config (two views, block mask) and times `dataset[i]` over N items by
process CPU time, which other processes on the machine disturb less than wall time. Run it against two
checkouts to compare them:

    OMP_NUM_THREADS=1 python scripts/mim_item_cost.py                      # configs/pretrain/fmnist.yaml
    OMP_NUM_THREADS=1 PYTHONPATH=OTHER_CHECKOUT python scripts/mim_item_cost.py
"""

from __future__ import annotations

import argparse
import time

from beit.builders import build_mim_dataset, build_tokenizer
from beit.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/pretrain/fmnist.yaml")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    grid = cfg.tokenizer.image_size // build_tokenizer(cfg).downsample  # no model: model.pretrained need not exist
    ds = build_mim_dataset(cfg, (grid, grid))
    for i in range(100):  # warm caches and lazy imports
        ds[i % len(ds)]
    t = time.process_time()
    for i in range(args.items):
        ds[i % len(ds)]
    print(f"{args.config}: {(time.process_time() - t) / args.items * 1e3:.3f} ms of CPU per item "
          f"({args.items} items)")


if __name__ == "__main__":
    main()
