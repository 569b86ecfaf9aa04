"""`beit segment` against the official recipe (microsoft/unilm beit/semantic_segmentation on mmseg 0.x): the
loss's averaging, the resize, fp32 evaluation, multi-scale + flip testing, SyncBN across processes, and the
shipped ADE20K configs. Expected values are computed here by hand or re-implemented from mmseg's description,
never by the code under test."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from beit.config import Config, load_config
from beit.data.segmentation import SegTransform, resize_image

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------ loss
def test_loss_is_the_mmseg_all_pixel_average_and_the_switch_gives_the_labelled_mean():
    from beit.train.segment import make_seg_step, seg_loss

    # One image, 2 classes, 2x2 pixels; logits given at the label size (the upsampling is then the identity).
    # pixel (0,0): logits (0, 0), label 0        -> CE = ln 2
    # pixel (0,1): logits (ln 3, 0), label 0     -> CE = -ln(3/4) = ln(4/3)
    # pixels (1,0), (1,1): ignored (255)         -> 0, but they count in mmseg 0.x's denominator
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 1] = math.log(3)
    labels = torch.tensor([[[0, 0], [255, 255]]])
    by_hand = math.log(2) + math.log(4 / 3)
    assert seg_loss(logits, labels, 255).item() == pytest.approx(by_hand / 4)  # all 4 pixels
    assert seg_loss(logits, labels, 255, avg_non_ignore=True).item() == pytest.approx(by_hand / 2)  # 2 labelled

    class Stub(nn.Module):  # the segmenter's training interface with fixed outputs
        aux_weight = 0.4

        def forward_train(self, x):
            return logits.clone().requires_grad_(), torch.zeros(1, 2, 2, 2)

    out = make_seg_step(255)(Stub(), (torch.zeros(1, 1, 2, 2), labels))
    # aux logits all 0: CE = ln 2 at the 2 labelled pixels, averaged over 4
    assert out["loss_decode"].item() == pytest.approx(by_hand / 4)
    assert out["loss_aux"].item() == pytest.approx(2 * math.log(2) / 4)
    assert out["loss"].item() == pytest.approx(by_hand / 4 + 0.4 * 2 * math.log(2) / 4)
    assert load_config("configs/segment/beit_base_p16_ade20k_upernet.yaml").seg.loss_avg_non_ignore is False


# ------------------------------------------------------------------------------------------------ resize
def _bilinear_half_pixel(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """cv2 INTER_LINEAR on [C, H, W] in float64: source x = (dst + 0.5) * in/out - 0.5, clamped to the image,
    no antialiasing (written from OpenCV's documented half-pixel mapping)."""
    def axis(n_in, n_out):
        x = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(x).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), x - lo

    y0, y1, fy = axis(img.shape[1], oh)
    x0, x1, fx = axis(img.shape[2], ow)
    a = img.astype(np.float64)
    top = a[:, y0][:, :, x0] * (1 - fx) + a[:, y0][:, :, x1] * fx
    bottom = a[:, y1][:, :, x0] * (1 - fx) + a[:, y1][:, :, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


SIZES = [(20, 29), (74, 106), (13, 17), (100, 23)]  # down, up, strongly down, mixed


def test_resize_is_half_pixel_bilinear_without_antialias():
    img = np.random.default_rng(0).integers(0, 256, (3, 37, 53), dtype=np.uint8)
    for size in SIZES:
        ours = resize_image(torch.from_numpy(img), size).numpy().astype(np.float64)
        # exact half-pixel bilinear, rounded to 8 bits (fp32 arithmetic: ties may round either way)
        assert np.abs(ours - _bilinear_half_pixel(img, *size)).max() <= 0.5 + 1e-3, size
    # antialiasing is a switch, and it does change a downscaled high-frequency image
    checker = (np.indices((40, 40)).sum(0) % 2 * 255).astype(np.uint8)[None]
    plain, smooth = (resize_image(torch.from_numpy(checker), (13, 13), aa).float() for aa in (False, True))
    assert (plain - smooth).abs().max() > 40


def test_resize_matches_cv2():
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless not installed (the written-out reference "
                                            "of the test above still runs)")
    img = np.random.default_rng(0).integers(0, 256, (3, 37, 53), dtype=np.uint8)
    for size in SIZES:  # cv2's 11-bit fixed-point weights: within one grey level, mostly equal
        ours = resize_image(torch.from_numpy(img), size).numpy().astype(np.float64)
        ref = cv2.resize(img.transpose(1, 2, 0), size[::-1], interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        diff = np.abs(ours - ref)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.8, size


def test_the_pipelines_resize_their_images_as_cv2():
    img = np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    mask = np.zeros((48, 80), np.uint8)
    common = dict(crop=200, scale=(120, 30), cat_max_ratio=1.0, photometric=False, mean=[0.0] * 3, std=[1.0] * 3,
                  in_chans=3, ignore_index=255)
    # eval: (48, 80) rescaled to short edge 30 -> (30, 50)
    x, _ = SegTransform(ratio_range=(1.0, 1.0), train=False, **common)(Image.fromarray(img), mask)
    expected = _bilinear_half_pixel(img.transpose(2, 0, 1), 30, 50)
    assert x.shape == (3, 30, 50) and np.abs(x.numpy() * 255 - expected).max() <= 0.5 + 1e-3
    # train at ratio 1.5: short edge 45 -> (45, 75), crop 200 keeps it whole, maybe flipped, padded after
    tf = SegTransform(ratio_range=(1.5, 1.5), train=True, **common)
    for seed in range(3):
        x, _ = tf(Image.fromarray(img), mask, np.random.default_rng(seed))
        got, expected = x[:, :45, :75].numpy() * 255, _bilinear_half_pixel(img.transpose(2, 0, 1), 45, 75)
        assert min(np.abs(got - e).max() for e in (expected, expected[..., ::-1])) <= 0.5 + 1e-3
    # multi-scale testing: the eval transform leaves the image at its size (the evaluation rescales it)
    x, y = SegTransform(ratio_range=(1.0, 1.0), train=False, eval_rescale=False, **common)(Image.fromarray(img), mask)
    assert x.shape == (3, 48, 80) and torch.equal(x, torch.from_numpy(img).permute(2, 0, 1).float() / 255)


# ------------------------------------------------------------------------------------------------ evaluation
class _ConvSegmenter(nn.Module):
    """Logits at 1/4 resolution from an asymmetric, zero-padded conv: windows, scales and flips all change the
    result, so an averaging or flipping error shows. Records whether autocast was on in each forward."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 7, stride=4, padding=3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-1, 1, self.conv.weight.numel()).view_as(self.conv.weight))
        self.autocast = []

    def forward(self, x):
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return self.conv(x)


def _mmseg_aug_test(model, img, ratios, flip, short_edge, crop, stride):
    """mmseg 0.x `EncoderDecoder.aug_test` over MultiScaleFlipAug + unilm's SETR_Resize, written from their
    description: for each ratio (then flip), rescale so the short edge is int(short_edge * ratio), at least
    the crop; slide_inference (windows every `stride`, the last flush with the end, logits bilinearly upsampled
    to the window, summed, divided by the per-pixel count) resized to the original size; softmax; un-flip.
    The mean over all views."""
    h, w = img.shape[-2:]
    views = []
    for r in ratios:
        short = int(short_edge * r)
        short = crop if short < crop else short
        factor = short / min(h, w)
        nh, nw = int(h * factor + 0.5), int(w * factor + 0.5)
        scaled = F.interpolate(img, (nh, nw), mode="bilinear", align_corners=False)
        for f in ([False, True] if flip else [False]):
            x = torch.flip(scaled, [3]) if f else scaled
            preds, count = 0, torch.zeros(1, 1, nh, nw)
            for hi in range(max(nh - crop + stride - 1, 0) // stride + 1):
                for wi in range(max(nw - crop + stride - 1, 0) // stride + 1):
                    y1, x1 = hi * stride, wi * stride
                    y2, x2 = min(y1 + crop, nh), min(x1 + crop, nw)
                    y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                    out = F.interpolate(model(x[:, :, y1:y2, x1:x2]), (y2 - y1, x2 - x1), mode="bilinear",
                                        align_corners=False)
                    preds = preds + F.pad(out, (x1, nw - x2, y1, nh - y2))
                    count[:, :, y1:y2, x1:x2] += 1
            seg_logit = F.interpolate(preds / count, (h, w), mode="bilinear", align_corners=False)
            prob = F.softmax(seg_logit, dim=1)
            views.append(torch.flip(prob, [3]) if f else prob)
    return sum(views) / len(views)


def test_multi_scale_flip_test_equals_mmseg_aug_test_written_out():
    from beit.train.segment import seg_infer

    model = _ConvSegmenter()
    img = torch.randn(1, 1, 40, 70)
    # crop 32, stride 21 (2/3), short edge 24: ratios 0.5 and 1.0 -> 32 (raised to the crop), 1.75 -> 42
    cfg = Config.model_validate({"data": {"img_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.5]},
                                 "seg": {"scale": [96, 24], "eval_scales": [0.5, 1.0, 1.75], "eval_flip": True}})
    with torch.no_grad():
        got = seg_infer(cfg)(model, img)
        want = _mmseg_aug_test(model, img, [0.5, 1.0, 1.75], True, 24, 32, 21)
    assert got.shape == (1, 3, 40, 70)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # each view counts: without the flip, or without a scale, the average is another one
    for other in ({"eval_flip": False}, {"eval_scales": [0.5, 1.0]}):
        c = cfg.model_copy(update={"seg": cfg.seg.model_copy(update=other)})
        with torch.no_grad():
            assert (seg_infer(c)(model, img) - want).abs().max() > 1e-3, other


@needs_fmnist
@pytest.mark.parametrize("eval_amp", [False, True])
def test_evaluation_runs_in_fp32_unless_asked_and_multi_scale_scores_the_dataset(eval_amp):
    from beit.data.segmentation import build_seg_dataset
    from beit.train.segment import build_eval_loader, evaluate_segmenter, intersect_and_union, seg_metrics

    cfg = Config.model_validate({
        "data": {"dataset": "fmnist_scenes", "img_size": 32, "in_chans": 1, "mean": [0.286], "std": [0.353],
                 "num_workers": 0},
        "seg": {"scenes": [4, 3], "scale": [128, 32], "eval_batch_size": 3, "eval_scales": [0.5, 1.25],
                "eval_flip": True, "eval_amp": eval_amp},
        "train": {"device": "cpu", "amp": "bf16", "progress": False}})
    test = build_seg_dataset(cfg, "test")
    model, names = _ConvSegmenter(11), list(test.classes)
    loader = build_eval_loader(cfg, test)
    metrics, kept = evaluate_segmenter(model, loader, cfg, torch.device("cpu"), names, keep=3)
    assert model.autocast and all(a == eval_amp for a in model.autocast)
    if eval_amp:
        return
    # fp32: the metrics are those of the hand-written aug_test over the original 64 px scenes
    counts = torch.zeros(4, 11, dtype=torch.float64)
    for i in range(len(test)):
        img, mask = test[i]
        assert img.shape[-2:] == mask.shape == (64, 64)  # not rescaled by the dataset
        with torch.no_grad():
            pred = _mmseg_aug_test(model, img[None], [0.5, 1.25], True, 32, 32, 21).argmax(1)[0]
        assert torch.equal(pred, kept[i][2])
        counts += intersect_and_union(pred, mask, 11, 255)
    assert metrics == seg_metrics(counts, names)


# ------------------------------------------------------------------------------------------------ SyncBN
@needs_fmnist
def test_sync_bn_on_two_processes_equals_one_process_over_the_global_batch(tmp_path):
    out = tmp_path / "syncbn.json"
    with socket.socket() as s:  # a free port: other test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          port, str(Path(__file__).with_name("_dist_syncbn.py")), str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    one = r["one"]
    assert one["bn_classes"] == ["BatchNorm2d"] and len(one["stats"]) >= 10  # heads and neck
    for name in ("ddp", "fsdp"):  # converted automatically under the process group
        assert r[name]["bn_classes"] == ["GlobalBatchNorm"], name
        assert r[name]["stats"].keys() == one["stats"].keys()
        for k, v in one["stats"].items():
            assert r[name]["stats"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (name, k)
        # the backward is the global batch's too. Per tensor, relative to its largest entry: fp32 reduction
        # order alone moves the patch-embedding gradient by ~5e-4 of its scale (one process, batch reordered).
        assert max(_grad_error(r[name]["grads"], one["grads"]).values()) < 1e-2, name
    # seg.sync_bn=false: per-process statistics and gradients, measurably not the global batch's
    off = r["ddp_no_sync"]
    assert off["bn_classes"] == ["BatchNorm2d"]
    assert max(abs(a - b) for k in one["stats"] for a, b in zip(off["stats"][k], one["stats"][k])) > 1e-3
    assert max(_grad_error(off["grads"], one["grads"]).values()) > 0.1


def _grad_error(got: dict, ref: dict) -> dict:
    """Per parameter: max |got - ref| / max |ref| over the recorded entries. `neck.fpn1.0.bias` is left out: a
    bias right before a BatchNorm has a zero gradient in exact arithmetic (its ~1e-6 here is rounding)."""
    return {k: max(abs(a - b) for a, b in zip(got[k], v)) / max(map(abs, v)) for k, v in ref.items()
            if k != "neck.fpn1.0.bias"}


# ------------------------------------------------------------------------------------------------ configs
def _mmcv_poly_lr(it: int, base: float, warmup: int, max_iters: int) -> float:
    """mmcv 0.x `PolyLrUpdaterHook(power=1, min_lr=0)` with linear warmup (ratio 1e-6), per iteration."""
    regular = base * (1 - it / max_iters)
    if it >= warmup:
        return regular
    return regular * (1 - (1 - it / warmup) * (1 - 1e-6))


def test_large_config_counts_the_official_updates_and_scale():
    from beit.train.distributed import DistInfo
    from beit.train.loop import Task, _setup, lr_at

    cfg = load_config("configs/segment/beit_large_p16_ade20k_upernet.yaml", ["train.device=cpu"])
    assert (cfg.data.batch_size, cfg.optim.accum_steps, cfg.global_batch(8)) == (1, 2, 16)  # update_interval 2
    assert cfg.seg.scale == (2560, 640) and (cfg.data.img_size, cfg.seg.stride) == (640, 426)
    # The loop's schedule on 8 processes over ADE20K's 20,210 training images counts optimizer updates.
    run = _setup(cfg, Task(model=nn.Linear(2, 2), step=None, dataset=list(range(20210))), DistInfo(world_size=8),
                 None)
    assert (run.global_batch, run.total_steps, run.warmup) == (16, 160000, 1500)
    assert run.eval_every == 16002  # the official 32k-iteration evaluation interval, in updates
    # The official lr is set per iteration (320k, warmup 3000) and applied every 2nd: update k uses iteration
    # 2k + 1. Ours agrees within 1% of the peak everywhere (mmcv's poly spans the whole run, ours the
    # post-warmup part; docs/deviations.md); a warmup of 3000 updates would be 50% off at update 1500.
    lr = cfg.optim.lr
    for k in (0, 700, 1499, 1500, 40000, 100000, 159999):
        ours = lr_at(k, lr, 0.0, run.warmup, run.total_steps, "poly", 1.0)
        assert ours == pytest.approx(_mmcv_poly_lr(2 * k + 1, lr, 3000, 320000), abs=0.01 * lr), k
    for name in ("beit_base_p16_ade20k_upernet", "beit_base_p16_ade20k_upernet_ift", "beit_large_p16_ade20k_upernet"):
        c = load_config(f"configs/segment/{name}.yaml")  # training-time evaluation: single scale, fp32
        assert c.seg.eval_scales is None and not c.seg.eval_flip and not c.seg.eval_amp and c.seg.sync_bn


def test_random_rescale_truncates_the_scaled_target_as_mmseg():
    from beit.data.segmentation import rescale_size

    # mmseg Resize.random_sample_ratio: target (int(2048 r), int(512 r)); r = 1.2999 -> (2662, 665), then mmcv
    # imrescale of 1000 x 1000: factor min(2662 / 1000, 665 / 1000) = 0.665 -> int(1000 * 0.665 + 0.5) = 665
    # (with the untruncated 665.5488 it would be 666).
    assert rescale_size(1000, 1000, (2048, 512), 1.2999) == (665, 665)
