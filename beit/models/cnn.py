"""A small CNN, the reference arm of `beit study`: what a few hundred thousand parameters of convolution reach
on the same labels and budget, trained from scratch by the same loop.

The shape is the "2 conv + 3 FC" network of the Fashion-MNIST benchmark table (Xiao et al., arXiv 1708.07747;
zalandoresearch/fashion-mnist README): two 5x5 convolutions with max-pooling, then three linear layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    def __init__(self, img_size: int = 32, in_chans: int = 1, num_classes: int = 10, widths=(32, 64),
                 hidden=(256, 128), drop_rate: float = 0.25):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"SmallCNN pools twice by 2: img_size must be a multiple of 4, got {img_size}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        c1, c2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # [B, c1, S/2, S/2]
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # [B, c2, S/4, S/4]
        )
        dims = [c2 * (img_size // 4) ** 2, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Dropout(drop_rate), nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.classifier = nn.Sequential(*layers, nn.Linear(dims[-1], num_classes))

    def no_weight_decay(self) -> set[str]:
        return set()  # biases are exempt by shape in the optimizer already

    def set_grad_checkpointing(self, enable: bool = True):
        if enable:
            raise ValueError("SmallCNN has no blocks to checkpoint; set model.grad_checkpointing=false")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # [B, num_classes]
