"""Semantic segmentation (BEiT + UperNet, the official `semantic_segmentation/` recipe) on the shared loop,
and its evaluation: sliding-window or whole-image inference, mIoU / per-class IoU / mAcc / aAcc.

batch = (images [B, C, S, S] after the mmseg train pipeline, masks [B, S, S] int64, ignore index where padded)
logits [B, K, S/4, S/4], aux [B, K, S/16, S/16] = segmenter.forward_train(images)
loss = CE(upsample(logits), masks) + aux_weight * CE(upsample(aux), masks)
       (ignored pixels add 0 and count in the mean, as mmseg 0.x: `seg.loss_avg_non_ignore`)

The backbone starts from `model.pretrained` (any checkpoint `model.pretrained` takes elsewhere, or a
pretraining run directory) or from scratch with `model.pretrained: null`; decoder and heads start from their
init. Layer-wise lr decay (`optim.layer_decay`), AdamW, warmup + poly (`optim.schedule: poly`) and the length in
iterations (`train.steps`) come from the shared loop. The loop evaluates every `train.eval_every_epochs` and
keeps best.pt (max mIoU).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from beit.config import Config, ConfigError
from beit.convert.runs import resolve_pretrained
from beit.convert.segmentation import load_pretrained_backbone, load_whole_segmenter
from beit.data import collate_skip_bad
from beit.data.segmentation import build_seg_dataset
from beit.models.segmentation import create_segmenter, upsample_logits
from beit.train.checkpoint import unwrap
from beit.train.distributed import DistInfo, all_reduce_sum, sync_batchnorm
from beit.train.evaluate import forward_share, is_sharded, read_summary, write_results
from beit.train.loop import Task
from beit.train.runner import open_run_dir

log = logging.getLogger("beit")


# ------------------------------------------------------------------------------------------------ metrics
def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Per-class pixel counts [4, K]: intersection, union, predicted area, label area (mmseg
    `intersect_and_union`); pixels whose label is `ignore_index` are left out of all four."""
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    hit = pred[pred == label]
    k = num_classes
    area_i, area_p, area_l = (torch.bincount(t.long(), minlength=k)[:k] for t in (hit, pred, label))
    return torch.stack([area_i, area_p + area_l - area_i, area_p, area_l]).double()


def seg_metrics(totals: torch.Tensor, names: list[str]) -> dict:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / accuracy from summed `intersect_and_union` counts.
    Classes absent from both labels and predictions (union 0) are left out of the means (None per class)."""
    inter, union, _, label = totals
    iou, acc = inter / union, inter / label  # nan where 0/0
    pct = lambda v: None if torch.isnan(v) else 100.0 * v.item()  # noqa: E731
    return {"mIoU": pct(iou.nanmean()), "mAcc": pct(acc.nanmean()), "aAcc": pct(inter.sum() / label.sum()),
            "per_class_iou": {n: pct(v) for n, v in zip(names, iou)},
            "per_class_acc": {n: pct(v) for n, v in zip(names, acc)}}


# ------------------------------------------------------------------------------------------------ inference
def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg `slide_inference` positions along one axis: every `stride`, the last window flush with the end."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


def slide_logits(model: nn.Module, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """[B, C, H, W] -> averaged logits [B, K, H, W] from crop x crop windows every `stride` pixels. A window
    that overhangs a small image is padded with 0 and its logits cut back."""
    b, _, h, w = images.shape
    total, count = None, images.new_zeros(1, 1, h, w)
    for y in window_starts(h, crop, stride):
        for x in window_starts(w, crop, stride):
            win = images[..., y:y + crop, x:x + crop]
            wh, ww = win.shape[-2:]
            win = F.pad(win, (0, crop - ww, 0, crop - wh))
            logits = upsample_logits(model(win), (crop, crop))[..., :wh, :ww].float()  # [B, K, wh, ww]
            if total is None:
                total = images.new_zeros(b, logits.shape[1], h, w, dtype=torch.float32)
            total[..., y:y + wh, x:x + ww] += logits
            count[..., y:y + wh, x:x + ww] += 1
    return total / count


def whole_logits(model: nn.Module, images: torch.Tensor, crop: int) -> torch.Tensor:
    """[B, C, H, W] -> logits [B, K, H, W]: the whole image resized to the model's crop x crop input."""
    h, w = images.shape[-2:]
    x = images if (h, w) == (crop, crop) else F.interpolate(images, (crop, crop), mode="bilinear", align_corners=False)
    return upsample_logits(model(x), (h, w)).float()


def seg_infer(cfg: Config) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """(model, images) -> scores at the images' size whose argmax is the prediction: logits in `seg.eval_mode`
    (slide, stride `seg.stride`, or whole), or with `seg.eval_scales` the multi-scale + flip softmax average."""
    crop = cfg.data.img_size
    if cfg.seg.eval_mode == "whole":
        single = lambda model, x: whole_logits(model, x, crop)  # noqa: E731
    else:
        stride = eval_stride(cfg)
        single = lambda model, x: slide_logits(model, x, crop, stride)  # noqa: E731
    s = cfg.seg
    if s.eval_scales is None:
        return single
    return lambda model, x: aug_test_probs(lambda im: single(model, im), x, s.eval_scales, s.eval_flip,
                                           min(s.scale), crop, s.resize_antialias)


def aug_scale_size(h: int, w: int, ratio: float, short_edge: int, crop: int) -> tuple[int, int]:
    """The size an h x w image is tested at for `ratio` in the official `_ms` configs (MultiScaleFlipAug with
    unilm's `SETR_Resize(setr_multi_scale=True)`): short edge int(short_edge * ratio), raised to the crop when
    smaller (so ratios below 1 often equal 1 on ADE20K), long edge following the aspect ratio, unbounded."""
    short = max(int(short_edge * ratio), crop)
    factor = short / min(h, w)
    return int(h * factor + 0.5), int(w * factor + 0.5)


def aug_test_probs(infer: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, ratios: list[float],
                   flip: bool, short_edge: int, crop: int, antialias: bool = False) -> torch.Tensor:
    """mmseg 0.x `EncoderDecoder.aug_test`: images [B, C, H, W] at their original size -> class probabilities
    [B, K, H, W], the mean over ratios (x flips) of softmax(logits at that scale, resized to H x W), each
    flipped view flipped back. `infer` (images -> logits at their size) is the sliding window.

    The image is rescaled here as a normalised float tensor; mmseg rescales the 8-bit image with cv2 before
    normalising (the same bilinear weights; ours skips the rounding to 8 bits)."""
    h, w = images.shape[-2:]
    total, n = None, 0
    for ratio in ratios:
        size = aug_scale_size(h, w, ratio, short_edge, crop)
        x = images if size == (h, w) else F.interpolate(images, size, mode="bilinear", align_corners=False,
                                                        antialias=antialias)
        for flipped in (False, True) if flip else (False,):
            logits = upsample_logits(infer(x.flip(-1) if flipped else x).float(), (h, w))  # [B, K, H, W]
            probs = logits.softmax(1)
            probs = probs.flip(-1) if flipped else probs
            total, n = probs if total is None else total + probs, n + 1
    return total / n


def eval_stride(cfg: Config) -> int:
    return cfg.seg.stride or max(1, cfg.data.img_size * 2 // 3)  # 512 -> 341, as official


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, loader: DataLoader, cfg: Config, device: torch.device,
                       names: list[str], keep: int = 0) -> tuple[dict, list]:
    """Metrics over `loader`; also returns the first `keep` (image, mask, prediction) triples for drawing
    (this rank's first: rank 0's are the dataset's first). In fp32 unless `seg.eval_amp` (then `train.amp`);
    multi-scale + flip with `seg.eval_scales` / `seg.eval_flip`.

    Under a process group each rank scores its share of the images (`forward_share`) and the per-class pixel
    counts are summed over ranks, so every rank returns what one process computes (the counts are integers:
    the sum is exact)."""
    infer, k, kept = seg_infer(cfg), len(names), []
    totals = torch.zeros(4, k, dtype=torch.float64)
    model.eval()
    amp = cfg.train.amp if cfg.seg.eval_amp else "none"  # official: fp32
    for x, y, scores in forward_share(loader, lambda images: infer(model, images), device, amp, "eval (test)",
                                      cfg.train.progress):
        if scores.shape[-2:] != y.shape[-2:]:  # the image was rescaled for inference; score at the mask's size
            scores = F.interpolate(scores, y.shape[-2:], mode="bilinear", align_corners=False)
        pred = scores.argmax(1).cpu()  # [B, H, W]
        totals += intersect_and_union(pred, y, k, cfg.seg.ignore_index)
        kept += [(x[i], y[i], pred[i]) for i in range(min(len(x), keep - len(kept)))]
    if is_sharded(loader):
        totals = all_reduce_sum(totals.to(device)).cpu()
    if not totals[3].sum():
        raise RuntimeError("the evaluation set yielded no labelled pixels (every file bad, or every label ignored)")
    return seg_metrics(totals, names), kept


# ------------------------------------------------------------------------------------------------ building
def build_segmenter(cfg: Config, num_classes: int, load: str = "backbone") -> nn.Module:
    """`create_segmenter(model.name, **overrides)` checked against data and seg config. load="backbone": the
    backbone from `model.pretrained` (null = scratch); load="all": the whole segmenter from a `beit segment` run."""
    model = create_segmenter(cfg.model.name, **cfg.model.overrides())
    check_seg_config(cfg, model, num_classes)
    path = resolve_pretrained(cfg.model.pretrained)
    if load == "all":
        if not path:
            raise ConfigError("model.pretrained must name a `beit segment` run directory or checkpoint")
        load_segmenter_weights(model, path)
    elif path and not hasattr(model, "backbone"):
        raise ConfigError(f"model.name {cfg.model.name} is a CNN trained from scratch: set model.pretrained=null")
    elif path:
        log.info(f"loading the backbone from {path}")
        load_pretrained_backbone(model, path)
    return model


def check_seg_config(cfg: Config, model: nn.Module, num_classes: int) -> None:
    """Config errors that would otherwise surface mid-run, raised before any run directory exists."""
    d, s = cfg.data, cfg.seg
    problems = []
    if model.num_classes != num_classes:
        problems.append(f"the data has {num_classes} classes but model.num_classes is {model.num_classes}; "
                        f"set model.num_classes={num_classes}")
    if d.img_size != model.img_size:
        problems.append(f"data.img_size (the crop) {d.img_size} != model img_size {model.img_size}")
    if d.in_chans != model.in_chans:
        problems.append(f"data.in_chans {d.in_chans} != model in_chans {model.in_chans}")
    if not num_classes <= s.ignore_index <= 255:
        problems.append(f"seg.ignore_index {s.ignore_index} must lie in [{num_classes}, 255] (masks are 8-bit and "
                        f"the index must not be a class)")
    if not 0 < eval_stride(cfg) <= d.img_size:
        problems.append(f"seg.stride {s.stride} must be in (0, crop {d.img_size}]: larger strides leave pixels "
                        f"no window covers")
    largest = min(s.scale) * s.ratio_range[1]
    if d.img_size > largest:
        problems.append(f"the crop data.img_size={d.img_size} exceeds the largest rescaled short edge "
                        f"{largest:g} (seg.scale x seg.ratio_range): every crop would be mostly padding; raise "
                        f"seg.scale or lower data.img_size")
    if problems:
        raise ConfigError("segmentation config: " + "; ".join(problems))


def load_segmenter_weights(model: nn.Module, path: str) -> None:
    """Every weight of a whole segmenter, any layout: a `beit segment` checkpoint, an HF export of one, an HF
    `BeitForSemanticSegmentation` folder, an official mmseg file."""
    try:
        load_whole_segmenter(model, path)
    except ValueError as e:
        raise ConfigError(f"{e}; `beit eval` needs a `beit segment` run or another whole segmenter") from None


def build_eval_loader(cfg: Config, dataset=None) -> DataLoader:
    dataset = dataset if dataset is not None else build_seg_dataset(cfg, cfg.train.eval_split)
    return DataLoader(dataset, batch_size=cfg.seg.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=collate_skip_bad)


@contextlib.contextmanager
def _train_forward(model: nn.Module):
    """Route `model(x)` to `forward_train` for one call, so a DDP wrapper still runs its forward hooks."""
    inner = unwrap(model)
    inner.forward = inner.forward_train  # an instance attribute shadows the class's forward
    try:
        yield model
    finally:
        del inner.forward


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, avg_non_ignore: bool = False):
    """Pixel cross-entropy of logits [B, K, h, w] (upsampled to the labels' size) against labels [B, H, W].

    avg_non_ignore=False (mmseg 0.x, what the official configs ran): summed over the labelled pixels and
    divided by all B*H*W pixels, ignored ones included; True: the mean over labelled pixels only
    (`F.cross_entropy`'s, mmseg's later `avg_non_ignore=True`). With 25% of pixels ignored the first is 0.75x."""
    logits = upsample_logits(logits, labels.shape[-2:]).float()
    if avg_non_ignore:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / labels.numel()


def make_seg_step(ignore_index: int, avg_non_ignore: bool = False) -> Callable[[nn.Module, tuple], dict]:
    def seg_step(model, batch):
        x, y = batch  # [B, C, S, S], [B, S, S]
        with _train_forward(model) as m:
            logits, aux = m(x)
        inner = unwrap(model)
        loss = seg_loss(logits, y, ignore_index, avg_non_ignore)
        out = {"loss_decode": loss.detach()}
        if aux is not None:
            aux_loss = seg_loss(aux, y, ignore_index, avg_non_ignore)
            loss = loss + inner.aux_weight * aux_loss
            out["loss_aux"] = aux_loss.detach()
        return {"loss": loss, **out}

    return seg_step


def build_segment_task(cfg: Config, device: torch.device):
    # Data and config errors first: they are cheap to find, a large checkpoint is not cheap to load.
    train = build_seg_dataset(cfg, "train")
    test = build_seg_dataset(cfg, cfg.train.eval_split)  # periodic evaluation: "val" while choosing a recipe
    names = list(train.classes)
    model = build_segmenter(cfg, len(names))
    if cfg.seg.sync_bn:  # under torchrun: BatchNorm over the global batch (official SyncBN); before DDP / FSDP
        model = sync_batchnorm(model)
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    loader = build_eval_loader(cfg, test)

    def evaluate(m: nn.Module) -> dict:
        return evaluate_segmenter(m, loader, cfg, device, names)[0]

    step = make_seg_step(cfg.seg.ignore_index, cfg.seg.loss_avg_non_ignore)
    return Task(model=model, step=step, dataset=train, collate_fn=collate_skip_bad, evaluate=evaluate,
                best_metric="mIoU", class_names=names)


def report_segment(cfg: Config, run_dir: Path) -> None:
    """After `beit segment`: results.json (the last evaluation, best mIoU and how it was evaluated)."""
    summary = read_summary(run_dir)
    last = summary.get("eval", {})
    write_results(run_dir, {"command": "segment", "pretrained": cfg.model.pretrained, "steps": summary.get("steps"),
                            **eval_settings(cfg), "best_mIoU": summary.get("best"), **last})


# ------------------------------------------------------------------------------------------------ beit eval
def run_seg_eval(cfg: Config, info: DistInfo, overwrite: bool = False) -> Path | None:
    """`beit eval` of a segmentation checkpoint: results.json (mIoU, mAcc, aAcc, per-class IoU / accuracy), in
    the processes of `info` (rank 0 writes; the others return None)."""
    test = build_seg_dataset(cfg, "test")
    model = build_segmenter(cfg, len(test.classes), load="all").to(info.device)  # fails before any run directory
    run_dir = open_run_dir(cfg, overwrite=overwrite) if info.is_main else None
    metrics, _ = evaluate_segmenter(model, build_eval_loader(cfg, test), cfg, info.device, list(test.classes))
    if run_dir is None:
        return None
    write_results(run_dir, {"checkpoint": resolve_pretrained(cfg.model.pretrained), "split": "test",
                            "num_images": len(test), **eval_settings(cfg), **metrics})
    log.info(f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}  "
             f"({len(test)} images, {eval_settings(cfg)})")
    return run_dir


def eval_settings(cfg: Config) -> dict:
    """How the reported metrics were evaluated (written beside them in results.json)."""
    s = cfg.seg
    return {"eval_mode": s.eval_mode, "eval_scales": s.eval_scales, "eval_flip": s.eval_flip,
            "eval_precision": cfg.train.amp if s.eval_amp and cfg.train.amp != "none" else "fp32"}
