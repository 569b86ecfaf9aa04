"""Semantic segmentation data: ADE20K, a generic images/ + masks/ folder, Fashion-MNIST scenes, and the mmseg
ADE20K pipeline as joint image/mask transforms.

Train pipeline (mmseg `configs/_base_/datasets/ade20k.py`, used by the official BEiT configs):
    rescale to `seg.scale` (2048, 512) x U(ratio_range 0.5-2.0), keeping the aspect ratio
    -> random crop `data.img_size` (512), redrawn up to 10 times while one class covers > cat_max_ratio (0.75)
    -> horizontal flip (p 0.5) -> photometric distortion -> normalise -> pad to the crop (image 0, mask 255).
Eval: rescale to `seg.scale` at ratio 1 and normalise; the mask stays at its original size (metrics are
computed there, as mmseg does). With `seg.eval_scales` (multi-scale test) the image is only normalised: the
evaluation rescales it to each ratio itself (beit/train/segment.py).

Images are resized bilinearly with half-pixel centres and, by default, no antialiasing: cv2's INTER_LINEAR,
which mmcv.imresize calls in the official pipeline (`seg.resize_antialias=true` smooths downscaled images).

Image and mask go through the same torchvision `transforms.v2.functional` calls as `tv_tensors.Image` and
`tv_tensors.Mask`, so every geometric op is applied to both with the same parameters, and masks are always
resized with nearest-neighbour. The random parameters are drawn from a `np.random.Generator` keyed by
(seed, epoch, index), as in the rest of the data pipeline, so a resumed run sees the same samples.

Bad files. A missing or undecodable image or mask, a mask of another size than its image, or a mask with a
label outside [0, num_classes) and not the ignore index, is handled by `data.on_bad_file`: "fail" raises
naming the file; "skip" returns a `BadSample` (counted in the run summary by the loop), never a silent drop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from beit.config import SEG_DATASETS, Config, ConfigError

from .datasets import (FASHION_MNIST_CLASSES, IMG_EXTENSIONS, BadSample, SubsetDataset, decode_or_skip,
                       load_fashion_mnist, open_image, skip_or_fail, stratified_holdout)
from .transforms import _check_stats, pil_mode

log = logging.getLogger(__name__)

MASK_MODES = ("L", "P")  # 8-bit single-channel label maps
ADE20K_CLASSES = (Path(__file__).resolve().parent.parent / "assets" / "ade20k_classes.txt").read_text().splitlines()
FMNIST_SCENES_CLASSES = ["background", *FASHION_MNIST_CLASSES]  # label 0, then garment class + 1

# ------------------------------------------------------------------------------------------------ transforms
def rescale_size(h: int, w: int, scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """mmcv `imrescale` with keep_ratio: the largest size whose long edge <= int(scale[0] * ratio) and short edge
    <= int(scale[1] * ratio) (mmseg's `Resize.random_sample_ratio` truncates the scaled target to integers)."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, *size], bilinear with half-pixel centres. antialias=False is cv2's
    INTER_LINEAR (mmcv.imresize): computed in float32 and rounded, so within one grey level of cv2's fixed-point
    result (torchvision's own uint8 bilinear kernel is off the exact value by up to one level on about a
    quarter of the pixels). antialias=True widens the filter when downscaling (PIL-like)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.resize(image.as_subclass(torch.Tensor).float(), list(size), InterpolationMode.BILINEAR,
                   antialias=antialias)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def crop_box(mask: np.ndarray, crop: int, cat_max_ratio: float, ignore_index: int,
             rng: np.random.Generator) -> tuple[int, int]:
    """mmseg `RandomCrop`: (top, left) of a crop x crop box (clipped to the image), redrawn up to 10 times while
    one class covers >= cat_max_ratio of the non-ignored pixels of the box (the last draw is kept)."""
    h, w = mask.shape
    for _ in range(10 if cat_max_ratio < 1 else 1):
        top, left = int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))
        window = mask[top:top + crop, left:left + crop]
        _, counts = np.unique(window[window != ignore_index], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg `PhotoMetricDistortion` on uint8 [H, W, C]: brightness +U(-32, 32), contrast xU(0.5, 1.5) (before or
    after the HSV ops, at random), saturation xU(0.5, 1.5), hue +U{-18..18} (of 180); each with p 0.5. The HSV
    ops are skipped on grayscale images (their random numbers are still drawn)."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    sat = rng.uniform(0.5, 1.5) if rng.integers(2) else None
    hue = int(rng.integers(-18, 19)) if rng.integers(2) else None
    if img.shape[-1] == 3 and (sat is not None or hue is not None):
        hsv = rgb_to_hsv(img.astype(np.float32) / 255)
        if sat is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue / 180) % 1.0
        img = convert(hsv_to_rgb(hsv) * 255)
    if mode == 0:
        img = contrast(img)
    return img


class SegTransform:
    """(PIL image, uint8 mask [H, W], rng) -> (image [C, H', W'] normalised, mask int64 [h, w]).

    train=True: the mmseg train pipeline (module docstring), output crop x crop. train=False: rescale the image
    to `scale` at ratio 1 (unless `eval_rescale` is False) and normalise; the mask keeps its original size.
    """

    def __init__(self, crop: int, scale: Sequence[int], ratio_range: Sequence[float], cat_max_ratio: float,
                 photometric: bool, mean: Sequence[float], std: Sequence[float], in_chans: int,
                 ignore_index: int, train: bool, antialias: bool = False, eval_rescale: bool = True):
        _check_stats(mean, std, in_chans)
        self.crop, self.scale, self.ratio_range = int(crop), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.photometric, self.train = cat_max_ratio, photometric, train
        self.mean, self.std, self.mode, self.ignore_index = list(mean), list(std), pil_mode(in_chans), ignore_index
        self.antialias, self.eval_rescale = antialias, eval_rescale

    def __call__(self, img: Image.Image, mask: np.ndarray, rng: np.random.Generator | None = None):
        image = tv_tensors.Image(F.pil_to_tensor(img.convert(self.mode)))  # uint8 [C, H, W]
        target = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))[None])  # uint8 [1, H, W]
        h, w = image.shape[-2:]
        if not self.train:
            if self.eval_rescale:
                image = resize_image(image, rescale_size(h, w, self.scale), self.antialias)
            return self._normalize(image), target[0].long()
        size = list(rescale_size(h, w, self.scale, rng.uniform(*self.ratio_range)))
        image, target = resize_image(image, size, self.antialias), F.resize(target, size)  # mask: nearest
        top, left = crop_box(target[0].numpy(), self.crop, self.cat_max_ratio, self.ignore_index, rng)
        image, target = (F.crop(t, top, left, min(self.crop, size[0] - top), min(self.crop, size[1] - left))
                         for t in (image, target))
        if rng.random() < 0.5:
            image, target = F.horizontal_flip(image), F.horizontal_flip(target)
        if self.photometric:
            image = torch.from_numpy(photometric_distortion(image.permute(1, 2, 0).numpy(), rng)).permute(2, 0, 1)
        image = self._normalize(image)
        pad = [0, 0, self.crop - image.shape[-1], self.crop - image.shape[-2]]  # left, top, right, bottom
        return F.pad(image, pad, fill=0.0), F.pad(target, pad, fill=self.ignore_index)[0].long()

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(image.float() / 255, self.mean, self.std)


# ------------------------------------------------------------------------------------------------ datasets
class _SegDataset(Dataset):
    """Shared by the segmentation datasets: `load_pair(i)` -> (PIL image, uint8 mask) | BadSample; transform with
    an rng keyed by (seed, epoch, index); labels checked against the class list."""

    classes: list[str]

    def __init__(self, transform: SegTransform | None, on_bad_file: str, ignore_index: int, seed: int = 0):
        self.transform, self.on_bad_file, self.ignore_index = transform, on_bad_file, ignore_index
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def bad(self, path: str, problem: str) -> BadSample:
        return skip_or_fail(self.on_bad_file, path, problem)

    def __getitem__(self, i: int):
        pair = self.load_pair(i)
        if isinstance(pair, BadSample):
            return pair
        img, mask = pair
        over = (mask >= len(self.classes)) & (mask != self.ignore_index)
        if over.any():
            return self.bad(self.describe(i), f"mask has label {int(mask[over].max())}, but the dataset has "
                                              f"{len(self.classes)} classes (and ignore index {self.ignore_index})")
        if self.transform is None:
            return img, mask
        return self.transform(img, mask, np.random.default_rng([self.seed, self.epoch, int(i)]))

    def describe(self, i: int) -> str:
        return f"sample {i}"

    def load_image(self, i: int):
        """The image alone, for `MIMDataset`: `beit pretrain` on a segmentation set's images, masks unused."""
        pair = self.load_pair(i)
        return pair if isinstance(pair, BadSample) else pair[0]


class SegFolderDataset(_SegDataset):
    """`image_dir/*.jpg` with `mask_dir/<same stem>.png` (8-bit label maps). ADE20K and `seg_folder` both use it."""

    def __init__(self, image_dir: Path, mask_dir: Path, classes: list[str], mode: str, transform=None,
                 on_bad_file: str = "skip", ignore_index: int = 255, reduce_zero_label: bool = False, seed: int = 0):
        super().__init__(transform, on_bad_file, ignore_index, seed)
        for d, what in ((image_dir, "image"), (mask_dir, "mask")):
            if not d.is_dir():
                raise FileNotFoundError(f"{what} folder '{d}' does not exist")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in '{image_dir}'")
        masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS}
        self.samples = [(p, masks.get(p.stem)) for p in images]
        missing = [str(p) for p, m in self.samples if m is None]
        if missing and on_bad_file == "fail":
            raise FileNotFoundError(f"{len(missing)} image(s) have no mask of the same stem in '{mask_dir}', e.g. "
                                    f"'{missing[0]}'; add the masks or set data.on_bad_file=skip")
        if missing:
            log.warning("%d image(s) have no mask in '%s' and will be skipped (counted), e.g. %s",
                        len(missing), mask_dir, missing[0])
        first = next((m for _, m in self.samples if m is not None), None)
        if first is None:
            raise FileNotFoundError(f"no image in '{image_dir}' has a mask of the same stem in '{mask_dir}'")
        with Image.open(first) as f:
            if f.mode not in MASK_MODES:
                raise ConfigError(f"mask '{first}' has PIL mode {f.mode}; masks must be 8-bit single-channel label "
                                  f"maps (mode L or P, pixel value = class index), not colour-coded or 16-bit")
        self.classes, self.mode, self.reduce_zero_label = list(classes), mode, reduce_zero_label

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        return str(self.samples[i][1] or self.samples[i][0])

    def load_image(self, i: int):
        path = self.samples[i][0]
        return decode_or_skip(lambda: open_image(path, self.mode), self.on_bad_file, str(path))

    def load_pair(self, i: int):
        path, mask_path = self.samples[i]
        if mask_path is None:
            return self.bad(str(path), "no mask with the same stem")
        img = self.load_image(i)
        if isinstance(img, BadSample):
            return img
        mask = decode_or_skip(lambda: self._read_mask(mask_path), self.on_bad_file, str(mask_path), "mask")
        if isinstance(mask, BadSample):
            return mask
        if mask.shape != (img.height, img.width):
            return self.bad(str(mask_path), f"mask is {mask.shape[1]}x{mask.shape[0]} but its image '{path}' is "
                                            f"{img.width}x{img.height}")
        if self.reduce_zero_label:  # mmseg: 0 (other) -> ignore, k -> k - 1
            mask = mask.astype(np.int16) - 1
            mask[mask < 0] = self.ignore_index
            mask[mask == 254] = self.ignore_index
            mask = mask.astype(np.uint8)
        return img, mask

    def _read_mask(self, path: Path) -> np.ndarray | BadSample:
        with Image.open(path) as f:
            if f.mode not in MASK_MODES:
                return self.bad(str(path), f"mask has PIL mode {f.mode}, not an 8-bit label map (L or P)")
            return np.array(f)  # 'P' gives the palette indices, i.e. the labels


class FashionScenes(_SegDataset):
    """Deterministic 64x64 scenes of 1-4 Fashion-MNIST garments (scale 18-40 px, random position, later ones on
    top). A pixel's label is its garment's class + 1 where that garment's own pixel is > `threshold`, else it is
    left to what lies below (background 0). Train scenes use only the 60k training images, test scenes only
    the 10k test images; with `val_size`, validation scenes use only that many held-out training images and
    train scenes the rest. Scene i is a function of (seed, split, i)."""

    classes = FMNIST_SCENES_CLASSES
    canvas, threshold, sizes, max_items = 64, 40, (18, 40), 4

    def __init__(self, root: str | None, split: str, num: int, transform=None, on_bad_file: str = "skip",
                 ignore_index: int = 255, seed: int = 0, scene_seed: int = 0, val_size: int = 0):
        super().__init__(transform, on_bad_file, ignore_index, seed)
        self.images, self.labels = load_fashion_mnist(root, "test" if split == "test" else "train")
        if val_size:  # validation scenes from held-out training garments, training scenes from the rest
            held = stratified_holdout(self.labels, val_size)
            keep = held if split == "val" else np.setdiff1d(np.arange(len(self.labels)), held)
            self.images, self.labels = self.images[keep], self.labels[keep]
        self.num, self.split_id, self.scene_seed = int(num), ("train", "test", "val").index(split), int(scene_seed)

    def __len__(self) -> int:
        return self.num

    def load_pair(self, i: int):
        rng = np.random.default_rng([self.scene_seed, self.split_id, int(i)])
        n = self.canvas
        canvas, mask = np.zeros((n, n), np.uint8), np.zeros((n, n), np.uint8)
        for _ in range(int(rng.integers(1, self.max_items + 1))):
            j, s = int(rng.integers(len(self.images))), int(rng.integers(self.sizes[0], self.sizes[1] + 1))
            top, left = int(rng.integers(0, n - s + 1)), int(rng.integers(0, n - s + 1))
            garment = np.asarray(Image.fromarray(self.images[j]).resize((s, s), Image.BILINEAR))
            on = garment > self.threshold  # the garment's own bright pixels cover what lies below
            canvas[top:top + s, left:left + s][on] = garment[on]
            mask[top:top + s, left:left + s][on] = self.labels[j] + 1
        return Image.fromarray(canvas, "L"), mask


# ------------------------------------------------------------------------------------------------ building
def read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"class names file '{path}' does not exist (one name per line; set seg.class_names)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"class names file '{path}' is empty")
    return names


def _split_dir(root: Path, names: Sequence[str]) -> str:
    return next((n for n in names if (root / n).is_dir()), names[0])


def build_seg_transform(cfg: Config, train: bool) -> SegTransform:
    d, s = cfg.data, cfg.seg
    return SegTransform(d.img_size, s.scale, s.ratio_range, s.cat_max_ratio, s.photometric, d.mean, d.std,
                        d.in_chans, s.ignore_index, train, antialias=s.resize_antialias,
                        eval_rescale=s.eval_scales is None)  # multi-scale: the evaluation rescales


def build_seg_dataset(cfg: Config, split: str, train_transform: bool | None = None) -> _SegDataset | SubsetDataset:
    """The segmentation dataset of `cfg.data.dataset` for split "train" | "val" | "test", with the train pipeline
    on "train" and the eval pipeline otherwise (or as `train_transform` says; False/True, None = by split).
    "val" (data.val_size > 0): scenes of held-out training garments, or held-out training images of a folder."""
    d, s = cfg.data, cfg.seg
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if split == "val" and not d.val_size:
        raise ConfigError("the 'val' split needs data.val_size > 0 (training images held out for validation)")
    train = split == "train" if train_transform is None else train_transform
    tf = build_seg_transform(cfg, train)
    common = dict(transform=tf, on_bad_file=d.on_bad_file, ignore_index=s.ignore_index, seed=cfg.train.seed)
    if d.dataset == "fmnist_scenes":
        ds = FashionScenes(d.root, split, s.scenes[0 if split == "train" else 1], scene_seed=s.scene_seed,
                           val_size=d.val_size, **common)
    elif d.dataset in ("ade20k", "seg_folder"):
        if not d.root:
            raise ConfigError(f"data.root must be set for dataset '{d.dataset}'")
        root = Path(d.root).expanduser()
        mode = pil_mode(d.in_chans)
        if d.dataset == "ade20k":  # ADEChallengeData2016/{images,annotations}/{training,validation}
            sub = "validation" if split == "test" else "training"
            reduce = True if s.reduce_zero_label is None else s.reduce_zero_label
            ds = SegFolderDataset(root / "images" / sub, root / "annotations" / sub, ADE20K_CLASSES, mode,
                                  reduce_zero_label=reduce, **common)
        else:  # root/<split>/{images,masks}, class names from seg.class_names or root/classes.txt
            sub = _split_dir(root, ["test", "val", "validation"] if split == "test" else ["train"])
            names = read_class_names(Path(s.class_names) if s.class_names else root / "classes.txt")
            ds = SegFolderDataset(root / sub / "images", root / sub / "masks", names, mode,
                                  reduce_zero_label=bool(s.reduce_zero_label), **common)
    else:
        raise ConfigError(f"data.dataset '{d.dataset}' is not a segmentation dataset; use one of {SEG_DATASETS}")
    if d.val_size and d.dataset != "fmnist_scenes":  # a folder's images: a fixed random draw is held out
        held = stratified_holdout(np.zeros(len(ds), np.int64), d.val_size)
        ds = SubsetDataset(ds, held if split == "val" else np.setdiff1d(np.arange(len(ds)), held))
    n = d.train_subset if split == "train" else d.eval_subset
    if n is not None and n < len(ds):
        ds = SubsetDataset(ds, np.arange(n))
    return ds

