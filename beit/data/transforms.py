"""Image transforms: the pretraining two-view transform and the fine-tuning / evaluation transforms.

Pretraining (`TwoViewTransform`, official `DataAugmentationForBEiT`): colour jitter and horizontal flip on the
whole image, then ONE random-resized-crop box resized twice: bicubic to the patch view (normalised with
mean/std) and lanczos to the tokenizer view (kept in [0, 1]; the tokenizer applies its own input mapping, e.g.
DALL-E's map_pixels). Both views therefore show exactly the same content, so visual token (i, j) describes
patch (i, j). openmixup crops the two views independently; we do not.

All randomness of the two-view transform comes from the `np.random.Generator` passed in, which the dataset
derives from (seed, epoch, index): crops and masks are reproducible and a resumed run sees the same samples.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "lanczos": InterpolationMode.LANCZOS,
    "nearest": InterpolationMode.NEAREST,
}


def _interp(name: str) -> InterpolationMode:
    if name not in _INTERP:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {sorted(_INTERP)}")
    return _INTERP[name]


def unit_array(img: Image.Image) -> np.ndarray:
    """`TF.to_tensor`'s values for an 8-bit PIL image, [C, H, W] float32 in [0, 1], as a numpy array: the same
    float32 division by 255, without the per-call tensor overhead that made it most of a small image's cost."""
    x = np.asarray(img, dtype=np.float32)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return x / np.float32(255)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def _check_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(
            f"data.mean {list(mean)} and data.std {list(std)} must have in_chans={in_chans} entries each "
            f"(e.g. mean=[0.5], std=[0.5] for grayscale)"
        )


def pil_mode(in_chans: int) -> str:
    """PIL mode for `in_chans` (1 -> 'L', 3 -> 'RGB')."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    return "L" if in_chans == 1 else "RGB"


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """`img` in PIL mode `mode` ('L' or 'RGB'), converted only when it differs."""
    return img if img.mode == mode else img.convert(mode)


def random_resized_crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """One crop box (top, left, h, w) as torchvision/timm `RandomResizedCrop.get_params`, drawn from `rng`.

    10 attempts with area fraction ~ U(scale) and log-aspect (w/h) ~ U(log ratio); a box is valid if
    0 < w <= W and 0 < h <= H; position uniform with inclusive bounds. Otherwise a centre crop clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_area, u_ratio, u_top, u_left in rng.random((10, 4)):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u_top * (height - h + 1))  # inclusive: top in [0, H - h]
            left = int(u_left * (width - w + 1))
            return top, left, h, w
    # Fallback: centre crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _contrast(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's `adjust_contrast` on a PIL image (PIL's `ImageEnhance.Contrast`), with equal output bytes:
    the mean grey level is the pixel sum over the pixel count, as `ImageStat` computes it, but summed in numpy
    instead of ImageStat's Python loop over 256 histogram bins: 13 instead of 34 µs on a 28 px image."""
    grey = img if img.mode == "L" else img.convert("L")
    mean = int(int(np.asarray(grey, dtype=np.int64).sum()) / (grey.width * grey.height) + 0.5)
    degenerate = Image.new("L", img.size, mean)
    return Image.blend(degenerate if img.mode == "L" else degenerate.convert(img.mode), img, factor)


def color_jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """torchvision `ColorJitter(strength, strength, strength, hue=0)` on a PIL image, with randomness from `rng`.

    Factors ~ U(max(0, 1 - s), 1 + s) applied in a random order. Each adjustment is the PIL operation torchvision
    calls (`ImageEnhance`), called directly. Saturation is a no-op on 'L' images (it is still drawn, so the random
    stream does not depend on the image mode).
    """
    if strength <= 0:
        return img
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    factors = lo + (hi - lo) * rng.random(3)
    for k in rng.permutation(3):
        if k == 0:
            img = ImageEnhance.Brightness(img).enhance(float(factors[k]))
        elif k == 1:
            img = _contrast(img, float(factors[k]))
        elif img.mode != "L":
            img = ImageEnhance.Color(img).enhance(float(factors[k]))
    return img


class TwoViewTransform:
    """Shared jitter/flip/crop -> (patch view [C,H,W] normalised, tokenizer view [C,h,w] in [0, 1]).

    Args:
        patch_size_px: patch-view size (int or (H, W)), e.g. 224.
        tokenizer_size_px: tokenizer-view size, e.g. 112.
        scale, ratio: random-resized-crop area fraction and aspect (w/h) ranges.
        color_jitter: brightness/contrast/saturation strength (0 disables; hue is never jittered).
        hflip: horizontal flip probability.
        mean, std: patch-view normalisation (in_chans entries each).
        in_chans: 1 ('L') or 3 ('RGB'); other PIL modes are converted.
        patch_interp, tokenizer_interp: resize filters (official: bicubic and lanczos).
    """

    def __init__(
        self,
        patch_size_px: int | Sequence[int],
        tokenizer_size_px: int | Sequence[int],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        color_jitter: float = 0.4,
        hflip: float = 0.5,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        in_chans: int = 3,
        patch_interp: str = "bicubic",
        tokenizer_interp: str = "lanczos",
    ):
        _check_stats(mean, std, in_chans)
        if not (0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"data.crop_ratio must satisfy 0 < lo <= hi, got {tuple(ratio)}")
        self.patch_size = _pair(patch_size_px)
        self.tokenizer_size = _pair(tokenizer_size_px)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.color_jitter, self.hflip = float(color_jitter), float(hflip)
        self.mean, self.std = (np.asarray(v, np.float32)[:, None, None] for v in (mean, std))  # [C, 1, 1]
        self.mode = pil_mode(in_chans)
        # PIL's resampling filters for the two resizes, as torchvision maps them
        self.patch_filter, self.tokenizer_filter = (
            TF.pil_modes_mapping[_interp(name)] for name in (patch_interp, tokenizer_interp))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        img = color_jitter(to_mode(img, self.mode), self.color_jitter, rng)
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        top, left, h, w = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        # TF.resized_crop's PIL calls, made directly and sharing one crop: equal bytes, without torchvision's
        # per-call checks and logging (~6% of a 28 px item's cost). Sizes are (H, W); PIL takes (W, H).
        crop = img.crop((left, top, left + w, top + h))
        patch = crop.resize(self.patch_size[::-1], self.patch_filter)
        tok = crop.resize(self.tokenizer_size[::-1], self.tokenizer_filter)
        # TF.normalize(TF.to_tensor(x)) in numpy, the same float32 operations in the same order: equal bits.
        patch_view = torch.from_numpy((unit_array(patch) - self.mean) / self.std)  # [C, H, W]
        tok_view = torch.from_numpy(unit_array(tok))  # [C, h, w] in [0, 1]: PIL clips lanczos overshoot to uint8
        return patch_view, tok_view

    def __repr__(self) -> str:
        return (
            f"TwoViewTransform(patch={self.patch_size}, tokenizer={self.tokenizer_size}, scale={self.scale}, "
            f"ratio={tuple(round(r, 4) for r in self.ratio)}, color_jitter={self.color_jitter}, hflip={self.hflip}, "
            f"mode={self.mode})"
        )


class _GrayViaRGB:
    """Runs an RGB transform on a grayscale image and keeps one channel ([3,H,W] -> [1,H,W]).

    timm's RandAugment fills with an RGB tuple and some ops assume RGB, so 'L' images go through as gray RGB.
    Every op keeps R == G == B on gray input except pixel-mode random erasing, whose per-channel noise is still
    N(0, 1) in channel 0.
    """

    def __init__(self, rgb_transform):
        self.rgb_transform = rgb_transform

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.rgb_transform(img.convert("RGB"))[:1]

    def __repr__(self) -> str:
        return f"GrayViaRGB({self.rgb_transform!r})"


class _ToMode:
    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode})"


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, also defined at 0 bits (a black image, as Pillow < 13 gave).

    timm's `PosterizeIncreasing` keeps `4 - int(4 * m / 10)` bits, so a RandAugment magnitude that reaches
    timm's cap of 10 keeps 0 bits. With `rand-m9-mstd0.5` (the official fine-tuning recipe) a magnitude
    >= 10 is drawn ~2.3% of the time; Pillow 13 rejects 0 bits with a ValueError, which would stop
    fine-tuning within the first few thousand images.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit dropped: zeros, as the old Pillow lookup table gave
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(tf) -> None:
    """Point every posterize op of the RandAugment inside a timm transform at `_posterize`."""
    from timm.data.auto_augment import RandAugment, posterize

    for t in getattr(tf, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize


def eval_crop_pct(img_size: int, crop_pct: float | None) -> float:
    """Official default: 0.875 (Resize 256 -> CenterCrop 224), 1.0 at >= 384; also 1.0 at <= 32 (see below)."""
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct}")
        return crop_pct
    # Official skips Resize/CenterCrop for inputs <= 32 px (CIFAR-style); crop_pct 1.0 is the same for
    # images already at that size and still resizes images of another size (28 px Fashion-MNIST -> 32).
    return 1.0 if img_size >= 384 or img_size <= 32 else 0.875


def build_finetune_transform(cfg, train: bool):
    """Fine-tuning (train) or evaluation transform for a `DataConfig`: PIL image -> [in_chans, S, S] tensor.

    Train: timm `create_transform` with the official recipe (RandomResizedCrop bicubic, flip, RandAugment
    `cfg.auto_augment`, random erasing `cfg.reprob` in pixel mode; colour jitter `cfg.color_jitter` applies
    only without RandAugment, as in timm: turning RandAugment off turns jitter on unless it is set to 0).
    At <= 32 px the crop is RandomCrop(size, padding=4), as the official script does.
    Eval: Resize(int(size / crop_pct), bicubic) + CenterCrop(size), then normalise.
    """
    from timm.data import create_transform

    size, in_chans = int(cfg.img_size), int(cfg.in_chans)
    _check_stats(cfg.mean, cfg.std, in_chans)
    mode = pil_mode(in_chans)
    if not train:
        crop_pct = eval_crop_pct(size, cfg.crop_pct)
        return T.Compose(
            [
                _ToMode(mode),
                T.Resize(int(size / crop_pct), interpolation=InterpolationMode.BICUBIC),
                T.CenterCrop(size),
                T.ToTensor(),
                T.Normalize(cfg.mean, cfg.std),
            ]
        )
    # timm's RandAugment needs RGB: grayscale runs through with the statistics repeated over 3 channels.
    mean, std = (list(cfg.mean) * 3, list(cfg.std) * 3) if in_chans == 1 else (list(cfg.mean), list(cfg.std))
    tf = create_transform(
        input_size=size,
        is_training=True,
        color_jitter=cfg.color_jitter or None,
        auto_augment=cfg.auto_augment or None,
        interpolation="bicubic",
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
    )
    _patch_posterize(tf)
    if size <= 32:  # official (DeiT heritage): small inputs use a padded random crop instead of RRC
        resize = T.Resize(size, interpolation=InterpolationMode.BICUBIC)  # a no-op on images already at `size`
        tf.transforms[0] = T.Compose([resize, T.RandomCrop(size, padding=4)])
    return _GrayViaRGB(tf) if in_chans == 1 else T.Compose([_ToMode(mode), tf])
