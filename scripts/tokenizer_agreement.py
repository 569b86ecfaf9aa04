"""How fast, and how faithful, is the pretraining tokenizer in each memory layout and precision?

Encodes real pretraining batches (the tokenizer view of `configs/pretrain/fmnist.yaml`, or any pretraining
config) with the frozen tokenizer four ways: fp32 NCHW (the reference), fp32 channels-last, bf16 autocast,
bf16 channels-last. Prints each one's time per batch (median of 5) and the share of tokens equal to the
reference. A lower precision is only worth a switch if the agreement is >= 99.5%.

    OMP_NUM_THREADS=2 python scripts/tokenizer_agreement.py                     # shipped fmnist_dvae
    python scripts/tokenizer_agreement.py --config CONFIG.yaml tokenizer.name=PATH --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from beit.builders import build_mim_dataset, build_tokenizer
from beit.config import load_config
from beit.data import collate_mim_skip_bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="beit/configs/pretrain/fmnist.yaml")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", default=["tokenizer.name=fmnist_dvae"])
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = load_config(a.config, a.overrides)
    tok = build_tokenizer(cfg, device)
    grid = cfg.tokenizer.image_size // tok.downsample
    loader = torch.utils.data.DataLoader(build_mim_dataset(cfg, (grid, grid)), batch_size=cfg.data.batch_size,
                                         shuffle=True, collate_fn=collate_mim_skip_bad,
                                         generator=torch.Generator().manual_seed(0))
    batches = []
    for b in loader:
        batches.append(b["tok_image"].to(device))
        if len(batches) == a.batches:
            break

    def run(layout: torch.memory_format, amp: bool):
        tok.to(memory_format=layout)
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            # logits() skips encode's own channels-last conversion, so the layout is the one asked for
            return [tok.logits(x.contiguous(memory_format=layout)).argmax(1) for x in batches]

    ref = torch.cat(run(torch.contiguous_format, False))
    print(f"{len(batches)} batches of {cfg.data.batch_size}, device {device}, {torch.get_num_threads()} threads")
    print(f"{'layout':14s} {'precision':9s} {'ms/batch':>9s} {'tokens equal to fp32 NCHW':>26s}")
    for name, layout in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
        for amp in (False, True):
            out = torch.cat(run(layout, amp))
            times = []
            for _ in range(5):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(layout, amp)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / len(batches))
            agree = (out == ref).float().mean().item() * 100
            print(f"{name:14s} {'bf16' if amp else 'fp32':9s} {statistics.median(times) * 1e3:9.1f} {agree:25.3f}%")


if __name__ == "__main__":
    main()
