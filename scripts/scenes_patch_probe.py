"""How much class information do frozen backbone tokens carry on Fashion-MNIST scenes?

Builds the scenes segmenter's backbone (`beit_fmnist_patch4_64_upernet`) from a pretraining checkpoint or
with random weights, runs it frozen over scenes, and fits a linear classifier per block on the patch tokens
[B*256, D] against each 4x4 patch's majority label (background + 10 classes). Prints the test patch mIoU and
accuracy per block, and the same probe on the raw 4x4 pixels as a floor. No head, no fine-tuning: this
isolates what the pretraining put into the tokens from how fast a segmentation head learns to use it.

    python scripts/scenes_patch_probe.py runs/reproduce_fmnist_full/pretrain random
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from beit.data.segmentation import FashionScenes
from beit.builders import create_segmenter
from beit.train.segment import intersect_and_union, seg_metrics

MEAN, STD, CLASSES = 0.2860, 0.3530, 11  # configs/segment/fmnist_scenes.yaml


def scenes(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = FashionScenes(None, split, n)
    images, masks = zip(*(ds.load_pair(i) for i in range(n)))
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).float()[:, None] / 255  # [n, 1, 64, 64]
    return (x - MEAN) / STD, torch.from_numpy(np.stack(masks)).long()


def patch_labels(masks: torch.Tensor) -> torch.Tensor:
    """The majority label of each 4x4 patch, [n * 256]."""
    votes = F.avg_pool2d(F.one_hot(masks, CLASSES).permute(0, 3, 1, 2).float(), 4)  # [n, K, 16, 16]
    return votes.argmax(1).flatten()


@torch.inference_mode()
def block_tokens(bb: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Patch tokens after each block of backbone `bb`, each [n * 256, D]."""
    out = [[] for _ in bb.blocks]
    for batch in x.split(200):
        with torch.autocast("cpu", torch.bfloat16):
            for i, tokens in enumerate(bb.get_intermediate_layers(batch)):  # each [b, 257, D]
                out[i].append(tokens[:, 1:].float().flatten(0, 1))
    return [torch.cat(o) for o in out]


def linear_probe(f_train, y_train, f_test, y_test, steps: int = 300) -> tuple[float, float]:
    """(patch mIoU %, patch accuracy %) of a linear classifier on standardised features."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-5
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(f_train.shape[1], CLASSES)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(len(f_train), (8192,))
        loss = F.cross_entropy(lin(f_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = lin(f_test).argmax(1)
    m = seg_metrics(intersect_and_union(pred, y_test, CLASSES, ignore_index=255), FashionScenes.classes)
    return m["mIoU"], m["aAcc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inits", nargs="+", help="pretraining run directories or checkpoints, or 'random'")
    p.add_argument("--train", type=int, default=2000, help="training scenes for the probe")
    p.add_argument("--test", type=int, default=500, help="test scenes")
    a = p.parse_args()
    torch.manual_seed(0)
    (x_train, m_train), (x_test, m_test) = scenes("train", a.train), scenes("test", a.test)
    y_train, y_test = patch_labels(m_train), patch_labels(m_test)
    print(f"{'init':40s} {'tokens of':10s} patch mIoU  patch acc")
    for init in a.inits:
        torch.manual_seed(0)  # one backbone for both splits (a second random init would be another model)
        bb = create_segmenter("beit_fmnist_patch4_64_upernet", pretrained=None if init == "random" else init).backbone
        bb.eval()
        for i, (f_train, f_test) in enumerate(zip(block_tokens(bb, x_train), block_tokens(bb, x_test))):
            miou, acc = linear_probe(f_train, y_train, f_test, y_test)
            print(f"{init[-40:]:40s} block {i:<4d} {miou:10.2f} {acc:10.2f}", flush=True)
    pixels = [F.unfold(x, 4, stride=4).transpose(1, 2).flatten(0, 1) for x in (x_train, x_test)]  # [n*256, 16]
    miou, acc = linear_probe(pixels[0], y_train, pixels[1], y_test)
    print(f"{'raw 4x4 pixels':40s} {'-':10s} {miou:10.2f} {acc:10.2f}")


if __name__ == "__main__":
    main()
