"""Small CNNs, the reference arm of `beit study`: what a few hundred thousand parameters of convolution reach
on the same labels and budget, trained from scratch by the same loop.

Classification (`SmallCNN`): the "2 conv + 3 FC" network of the Fashion-MNIST benchmark table (Xiao et al.,
arXiv 1708.07747; zalandoresearch/fashion-mnist README): two 5x5 convolutions with max-pooling, then three linear
layers. Segmentation (`SmallUNet`): a two-level U-Net (Ronneberger et al., arXiv 1505.04597) with BatchNorm,
logits at full resolution.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv -> BN -> ReLU, the U-Net's unit."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallUNet(nn.Module):
    """image [B, C, S, S] -> encoder at S, S/2, S/4 -> decoder back up, each level fused with its skip ->
    logits [B, K, S, S]. The segmentation interface of `BeitSegmenter` (`forward_train` -> (logits, no aux))."""

    def __init__(self, img_size: int = 64, in_chans: int = 1, num_classes: int = 11, widths=(32, 64, 128)):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"SmallUNet pools twice by 2: img_size must be a multiple of 4, got {img_size}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        c1, c2, c3 = widths
        self.enc1, self.enc2, self.enc3 = _block(in_chans, c1), _block(c1, c2), _block(c2, c3)
        self.up2, self.dec2 = nn.ConvTranspose2d(c3, c2, 2, stride=2), _block(2 * c2, c2)
        self.up1, self.dec1 = nn.ConvTranspose2d(c2, c1, 2, stride=2), _block(2 * c1, c1)
        self.conv_seg = nn.Conv2d(c1, num_classes, 1)

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True):
        if enable:
            raise ValueError("SmallUNet has no blocks to checkpoint; set model.grad_checkpointing=false")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.enc1(x)  # [B, c1, S, S]
        f2 = self.enc2(F.max_pool2d(f1, 2))  # [B, c2, S/2, S/2]
        f3 = self.enc3(F.max_pool2d(f2, 2))  # [B, c3, S/4, S/4]
        d2 = self.dec2(torch.cat([self.up2(f3), f2], 1))  # [B, c2, S/2, S/2]
        d1 = self.dec1(torch.cat([self.up1(d2), f1], 1))  # [B, c1, S, S]
        return self.conv_seg(d1)  # [B, K, S, S]

    # (`beit segment` routes `forward` to `forward_train` for a training step: neither may call the other)
    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.logits(x), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def create_cnn(cls: type[nn.Module], name: str, preset: dict, overrides: dict) -> nn.Module:
    """A CNN preset with the few overrides a CNN takes; any other model key is an error naming it."""
    allowed = {"img_size", "in_chans", "num_classes"}
    extra = sorted(set(overrides) - allowed)
    if extra:
        raise ValueError(f"model {name} (a CNN) takes only {', '.join(f'model.{k}' for k in sorted(allowed))}; "
                         f"set {', '.join(f'model.{k}=null' for k in extra)}")
    return cls(**{**preset, **overrides})
