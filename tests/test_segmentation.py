"""Segmentation data, metrics, inference, the `beit segment` task and `beit reproduce fmnist-scenes`.

Metrics are checked against counts done by hand on small label maps; transforms against images whose mask can
be recomputed from their pixels; the bad-file and bad-config paths against the one-line errors they promise.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from beit.config import ConfigError, load_config
from beit.data.datasets import BadSample
from beit.data.segmentation import (FashionScenes, SegTransform, build_seg_dataset, crop_box, photometric_distortion,
                                    rescale_size)
from beit.train.loop import lr_at
from beit.train.segment import intersect_and_union, seg_metrics, window_starts

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
SCENES = "configs/segment/fmnist_scenes.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------ metrics
def test_iou_and_accuracies_match_hand_counts_with_ignored_pixels():
    label = torch.tensor([[0, 0, 1],
                          [1, 2, 255],
                          [2, 2, 255]])
    pred = torch.tensor([[0, 1, 1],
                         [1, 2, 0],   # the 0 under an ignored label does not count as a class-0 prediction
                         [0, 2, 2]])
    counts = intersect_and_union(pred, label, 3, 255)
    # By hand over the 7 labelled pixels. class 0: label {(0,0),(0,1)}, pred {(0,0),(2,0)} -> I 1, U 3.
    # class 1: label {(0,2),(1,0)}, pred {(0,1),(0,2),(1,0)} -> I 2, U 3.  class 2: label {(1,1),(2,0),(2,1)},
    # pred {(1,1),(2,1)} -> I 2, U 3.
    assert counts.tolist() == [[1, 2, 2], [3, 3, 3], [2, 3, 2], [2, 2, 3]]
    m = seg_metrics(counts, ["a", "b", "c"])
    assert m["per_class_iou"] == pytest.approx({"a": 100 / 3, "b": 200 / 3, "c": 200 / 3})
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert m["per_class_acc"] == pytest.approx({"a": 50.0, "b": 100.0, "c": 200 / 3})
    assert m["mAcc"] == pytest.approx(100 * (0.5 + 1 + 2 / 3) / 3)
    assert m["aAcc"] == pytest.approx(100 * 5 / 7)


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_means():
    label, pred = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    m = seg_metrics(intersect_and_union(pred, label, 3, 255), ["a", "b", "c"])
    assert m["per_class_iou"]["c"] is None
    assert m["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_poly_schedule_after_linear_warmup():
    assert lr_at(5, 1.0, 0.0, 10, 110, "poly") == pytest.approx(0.5)
    assert lr_at(10, 1.0, 0.0, 10, 110, "poly") == pytest.approx(1.0)
    assert lr_at(59, 1.0, 0.0, 10, 110, "poly", 1.0) == pytest.approx(1 - 49 / 99)
    assert lr_at(59, 1.0, 0.0, 10, 110, "poly", 2.0) == pytest.approx((1 - 49 / 99) ** 2)
    assert lr_at(109, 1.0, 0.1, 10, 110, "poly") == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------ inference
def test_window_positions_follow_mmseg_slide_inference():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]  # 2 rows: 0 and the window flush with the end
    assert window_starts(1100, 512, 341) == [0, 341, 588]
    assert window_starts(300, 512, 341) == [0]  # smaller than the crop: one (padded) window


def _hand_slide(model, x, windows, crop):
    """The sliding-window average written out for explicitly listed (top, left) windows: each window's logits
    bilinearly upsampled to the window (zero-padded to the crop first where it overhangs the image, then cut
    back), summed into place, divided by how many windows cover each pixel."""
    b, _, h, w = x.shape
    total, count = 0, torch.zeros(h, w)
    for top, left in windows:
        win = x[..., top:top + crop, left:left + crop]
        wh, ww = win.shape[-2:]
        logits = torch.nn.functional.interpolate(model(torch.nn.functional.pad(win, (0, crop - ww, 0, crop - wh))),
                                                 (crop, crop), mode="bilinear", align_corners=False)[..., :wh, :ww]
        total = total + torch.nn.functional.pad(logits, (left, w - left - ww, top, h - top - wh))
        count[top:top + wh, left:left + ww] += 1
    return total / count


class _ConvModel(torch.nn.Module):
    """Logits at 1/4 resolution from a fixed asymmetric zero-padded conv: a window's logits
    near its edges differ from the whole image's, so window positions and the averaging both show."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 7, stride=4, padding=3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-1, 1, self.conv.weight.numel()).view_as(self.conv.weight))

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_pads_an_image_smaller_than_the_crop():
    from beit.train.segment import slide_logits

    x = torch.randn(2, 1, 48, 56)  # one window, overhanging by 16 rows and 8 columns
    model = _ConvModel()
    with torch.no_grad():
        out = slide_logits(model, x, 64, 42)
        torch.testing.assert_close(out, _hand_slide(model, x, [(0, 0)], 64), rtol=0, atol=1e-6)
        # the overhang is padded, not the image resized: resizing gives other logits
        assert (out - _hand_slide(model, torch.nn.functional.interpolate(x, (64, 64)), [(0, 0)], 64)[..., :48, :56]
                ).abs().max() > 1e-2


@needs_fmnist
def test_sliding_window_average_for_the_fmnist_segmenter_on_a_larger_image():
    from beit.models.segmentation import create_segmenter
    from beit.train.segment import slide_logits

    torch.manual_seed(0)
    model = create_segmenter("beit_fmnist_patch4_64_upernet").eval()
    x = torch.randn(1, 1, 96, 80)
    # crop 64, stride 42: rows start at 0 and 32 (the last flush with the end), columns at 0 and 16
    with torch.no_grad():
        out = slide_logits(model, x, 64, 42)
        want = _hand_slide(model, x, [(0, 0), (0, 16), (32, 0), (32, 16)], 64)
    assert out.shape == (1, model.num_classes, 96, 80)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_sliding_windows_cover_a_larger_image_and_average_the_overlap():
    from beit.train.segment import slide_logits

    x = torch.randn(1, 1, 96, 80)
    model = _ConvModel()
    # crop 64, stride 32: rows start at 0 and 32, columns at 0 and 16 (flush with the end)
    with torch.no_grad():
        out = slide_logits(model, x, 64, 32)
        want = _hand_slide(model, x, [(0, 0), (0, 16), (32, 0), (32, 16)], 64)
    assert out.shape == (1, 3, 96, 80)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    # the windows disagree where they overlap (so the average is not any one window's logits)
    one = _hand_slide(model, x, [(0, 0)], 64)
    assert (out[..., 32:64, 16:64] - one[..., 32:64, 16:64]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ transforms
COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


def _block_scene(h=96, w=128, block=32, seed=0):
    """An RGB image of solid blocks whose colour encodes the class of the mask below it."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 4, (h // block, w // block))
    mask = np.kron(grid, np.ones((block, block), np.int64)).astype(np.uint8)
    return Image.fromarray(COLOURS[mask]), mask


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_image_and_mask_aligned(seed):
    img, mask = _block_scene(seed=seed)
    tf = SegTransform(64, (256, 96), (0.5, 2.0), 0.75, photometric=False, mean=[0.5] * 3, std=[0.5] * 3,
                      in_chans=3, ignore_index=255, train=True)
    x, y = tf(img, mask, np.random.default_rng(seed))
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
    rgb = (x * 0.5 + 0.5).permute(1, 2, 0).numpy() * 255  # [64, 64, 3]
    labelled = y != 255
    recomputed = np.abs(rgb[..., None, :] - COLOURS[None, None].astype(float)).sum(-1).argmin(-1)  # nearest colour
    agree = (torch.from_numpy(recomputed) == y)[labelled].float().mean()
    # misses at block edges only: bilinear edges, and masks resized by cv2's nearest rule (floor(x * scale)), up to
    # half a source pixel off the image's half-pixel centres; a flipped or shifted mask agrees on ~1/4 to 1/2
    assert agree > 0.96
    # Padding: image 0 (after normalisation) exactly where the mask is the ignore index.
    assert torch.equal((x == 0).all(0), ~labelled)


def test_crop_retries_while_one_class_dominates():
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 90:] = 1  # class 1 only in the last 10 columns
    rng = np.random.default_rng(0)
    # A 20 px box passes (class 0 < 75%) when it holds >= 6 columns of class 1: left >= 76, p = 5/81 per draw.
    # With 10 draws ~47% of boxes pass; with one draw (cat_max_ratio 1) ~6%.
    passed = lambda ratio: sum(crop_box(mask, 20, ratio, 255, rng)[1] >= 76 for _ in range(200))  # noqa: E731
    assert passed(0.75) > 70 and passed(1.0) < 25
    assert crop_box(mask, 200, 0.75, 255, rng) == (0, 0)  # larger than the image: the whole image


def test_rescale_keeps_the_ratio_within_both_edges():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(300, 400, (2048, 512), 2.0) == (1024, 1365)  # short edge 1024; 400 * 1024 / 300
    assert rescale_size(100, 3000, (2048, 512)) == (68, 2048)  # the long edge binds


def test_photometric_distortion_is_a_function_of_the_rng_and_spares_grayscale_hue():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a = photometric_distortion(img, np.random.default_rng(3))
    assert np.array_equal(a, photometric_distortion(img, np.random.default_rng(3)))
    assert a.dtype == np.uint8 and not np.array_equal(a, img)
    gray = img[..., :1]
    g = photometric_distortion(gray, np.random.default_rng(3))
    assert g.shape == gray.shape


# ------------------------------------------------------------------------------------------------ datasets
@needs_fmnist
def test_fmnist_scenes_are_deterministic_and_labels_follow_the_pixels():
    from beit.data import load_fashion_mnist

    train = FashionScenes(None, "train", 50, scene_seed=0)
    test = FashionScenes(None, "test", 50, scene_seed=0)
    counts = np.zeros(11, np.int64)
    for ds in (train, test):
        for i in range(50):
            img, mask = ds.load_pair(i)
            pixels = np.asarray(img)
            assert img.size == (64, 64) and mask.dtype == np.uint8
            # A pixel is labelled exactly where some garment's own pixel was bright enough and drawn.
            assert np.array_equal(mask > 0, pixels > FashionScenes.threshold)
            counts += np.bincount(mask.ravel(), minlength=11)
    again = FashionScenes(None, "train", 50)
    assert np.array_equal(np.asarray(train.load_pair(7)[0]), np.asarray(again.load_pair(7)[0]))
    assert (counts[1:] > 0).sum() >= 9  # the garments of many classes appear
    # Train scenes draw only training images: every garment pixel is a resized training image pixel, so a
    # scene built from test images only would differ; check the split ids feed the generator.
    assert not np.array_equal(np.asarray(train.load_pair(0)[0]), np.asarray(test.load_pair(0)[0]))
    assert len(load_fashion_mnist(None, "test")[0]) == 10000 and len(test.images) == 10000
    assert len(train.images) == 60000


@needs_fmnist
def test_pretraining_reads_the_scene_images_without_their_masks():
    from beit.builders import build_mim_dataset

    # A whole-image crop without flip or jitter: the tokenizer view must be the scene itself.
    cfg = load_config("configs/pretrain/fmnist_scenes.yaml", ["seg.scenes=[8,2]", "data.crop_scale=[1,1]",
                                                               "data.crop_ratio=[1,1]", "data.hflip=0",
                                                               "data.color_jitter=0"])
    ds = build_mim_dataset(cfg, (16, 16))
    assert len(ds) == 8
    item = ds[3]
    scene = torch.from_numpy(np.asarray(FashionScenes(None, "train", 8).load_pair(3)[0], np.float32) / 255)
    assert item["image"].shape == item["tok_image"].shape == (1, 64, 64) and item["mask"].shape == (16, 16)
    assert (item["tok_image"][0] - scene).abs().max() <= 1 / 255
    assert int(item["mask"].sum()) == 102


def _write_folder(root, with_bad=True):
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "masks").mkdir(parents=True)
    (root / "classes.txt").write_text("bg\nthing\n")
    img, mask = _block_scene(64, 64, 16)
    for stem in ("a", "b", "c", "d", "e"):
        img.save(root / "train" / "images" / f"{stem}.png")
    Image.fromarray((mask > 0).astype(np.uint8)).save(root / "train" / "masks" / "a.png")  # good
    if with_bad:
        (root / "train" / "masks" / "c.png").write_bytes(b"not a png")  # undecodable
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(root / "train" / "masks" / "d.png")  # size mismatch
        Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "train" / "masks" / "e.png")  # label 7 of 2
    return root


def _folder_cfg(root, *extra):
    return load_config(None, ["data.dataset=seg_folder", f"data.root={root}", "data.img_size=64", "seg.scale=[128,64]",
                              *extra])


def test_seg_folder_bad_files_are_named_skips(tmp_path):
    ds = build_seg_dataset(_folder_cfg(_write_folder(tmp_path)), "train")
    assert ds.classes == ["bg", "thing"] and len(ds) == 5
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and set(y.unique().tolist()) <= {0, 1, 255}
    problems = {os.path.basename(ds[i].path): ds[i].error for i in range(1, 5)}
    assert all(isinstance(ds[i], BadSample) for i in range(1, 5))
    assert problems["b.png"] == "no mask with the same stem"
    assert "cannot decode mask" in problems["c.png"]
    assert "mask is 64x32 but its image" in problems["d.png"]
    assert "label 7" in problems["e.png"]


def test_pretraining_on_a_seg_folder_needs_no_masks(tmp_path):
    from beit.builders import build_mim_dataset

    root = _write_folder(tmp_path)  # a.png has a good mask, b.png none, c-e bad ones: all five images are fine
    (root / "train" / "images" / "f.png").write_bytes(b"not a png")
    cfg = _folder_cfg(root, "data.num_mask_patches=6", "data.min_mask_patches=null")
    ds = build_mim_dataset(cfg, (4, 4))
    items = [ds[i] for i in range(len(ds))]
    assert all(isinstance(x, dict) and x["image"].shape == (3, 64, 64) for x in items[:5])
    assert isinstance(items[5], BadSample) and items[5].path.endswith("f.png") and "cannot decode image" in items[5].error


def test_seg_folder_fail_mode_raises_naming_the_file(tmp_path):
    root = _write_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="b.png"):  # a missing mask is found before training
        build_seg_dataset(_folder_cfg(root, "data.on_bad_file=fail"), "train")
    (root / "train" / "images" / "b.png").unlink()
    ds = build_seg_dataset(_folder_cfg(root, "data.on_bad_file=fail"), "train")
    with pytest.raises(RuntimeError, match="c.png"):
        ds[1]


def test_colour_masks_are_a_config_error(tmp_path):
    root = _write_folder(tmp_path, with_bad=False)
    Image.new("RGB", (64, 64)).save(root / "train" / "masks" / "a.png")
    with pytest.raises(ConfigError, match="mode RGB.*8-bit"):
        build_seg_dataset(_folder_cfg(root), "train")


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    for sub in ("training", "validation"):
        (tmp_path / "images" / sub).mkdir(parents=True)
        (tmp_path / "annotations" / sub).mkdir(parents=True)
        Image.new("RGB", (4, 2)).save(tmp_path / "images" / sub / "x.jpg")
        labels = np.array([[0, 1, 2, 150], [150, 0, 1, 1]], np.uint8)
        Image.fromarray(labels).save(tmp_path / "annotations" / sub / "x.png")
    cfg = load_config("configs/segment/beit_base_p16_ade20k_upernet.yaml", [f"data.root={tmp_path}"])
    ds = build_seg_dataset(cfg, "test")
    assert len(ds.classes) == 150 and ds.classes[:3] == ["wall", "building", "sky"]
    img, mask = ds.load_pair(0)
    assert mask.tolist() == [[255, 0, 1, 149], [149, 255, 0, 0]]
    x, y = ds[0]
    assert x.shape == (3, 512, 1024) and y.tolist() == mask.tolist()  # eval: 2x4 -> short edge 512; mask kept


# ------------------------------------------------------------------------------------------------ configs
def test_shipped_configs_carry_the_official_recipes():
    ssl = load_config("configs/segment/beit_base_p16_ade20k_upernet.yaml")
    ift = load_config("configs/segment/beit_base_p16_ade20k_upernet_ift.yaml")
    large = load_config("configs/segment/beit_large_p16_ade20k_upernet.yaml")
    assert (ssl.optim.lr, ssl.optim.layer_decay, ift.optim.lr, ift.optim.layer_decay) == (7e-4, 0.65, 3e-5, 0.9)
    for c in (ssl, ift, large):
        assert c.optim.schedule == "poly" and c.optim.poly_power == 1.0 and c.optim.weight_decay == 0.05
        assert c.train.steps == 160000 and c.global_batch(8) == c.optim.recipe_batch_size == 16
        assert c.seg.cat_max_ratio == 0.75 and c.seg.ratio_range == (0.5, 2.0) and c.seg.eval_mode == "slide"
    assert (ssl.data.img_size, ssl.seg.stride, ssl.optim.warmup_steps) == (512, 341, 1500)
    assert (large.data.img_size, large.seg.stride, large.optim.warmup_steps) == (640, 426, 1500)  # updates
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("optim", "train")}  # noqa: E731
    assert strip(ssl) | {"train": 0} == strip(ift) | {"train": 0}


# ------------------------------------------------------------------------------------------------ the command
TINY = ["seg.scenes=[64,16]", "data.batch_size=8", "data.num_workers=0", "seg.eval_batch_size=8",
        "train.steps=4", "optim.warmup_steps=1", "train.log_every=2", "train.save_every_steps=2",
        "train.progress=false", "train.compile=false",  # 4 steps: compiling would dominate
        "model.pretrained=null"]  # last: TINY[:-1] drops it


def _main(argv):
    from beit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@needs_fmnist
@pytest.mark.parametrize("override, message", [
    ("model.num_classes=12", "the data has 11 classes but model.num_classes is 12"),
    ("seg.stride=80", "seg.stride 80 must be in"),
    ("seg.scale=[64,16]", "exceeds the largest rescaled short edge 32"),
    ("seg.ignore_index=5", "seg.ignore_index 5 must lie in"),
    ("data.in_chans=3", "data.mean"),  # 1-entry statistics for 3 channels
])
def test_bad_segmentation_configs_fail_in_one_line_before_any_run_directory(tmp_path, capsys, override, message):
    code = _main(["segment", SCENES, *TINY, f"train.out_dir={tmp_path}", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


@needs_fmnist
def test_segment_trains_evaluates_resumes_and_draws(tmp_path, capsys):
    args = ["segment", SCENES, *TINY, f"train.out_dir={tmp_path}", "train.run_name=seg"]
    from beit.cli import main

    main(args + ["train.max_steps=2"])  # stop half-way, then resume to the end
    assert [p.name for p in sorted((tmp_path / "seg").glob("ckpt-*.pt"))] == ["ckpt-00000002.pt"]
    main(args + ["--resume"])
    res = json.loads((tmp_path / "seg" / "results.json").read_text())
    assert res["steps"] == 4 and len(res["per_class_iou"]) == 11
    # the resumed run is the uninterrupted one, bit for bit: same seeded crops, flips and distortions
    main(["segment", SCENES, *TINY, f"train.out_dir={tmp_path}", "train.run_name=full"])
    a = torch.load(tmp_path / "full" / "ckpt-00000004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "seg" / "ckpt-00000004.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert full["mIoU"] == res["mIoU"] and full["per_class_iou"] == res["per_class_iou"]
    rows = [json.loads(line) for line in (tmp_path / "seg" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4]
    assert rows[0]["loss"] > 0 and "loss_aux" in rows[0]

    main(["eval", SCENES, *TINY[:-1], f"model.pretrained={tmp_path / 'seg'}", f"train.out_dir={tmp_path}",
          "train.run_name=ev"])
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["mIoU"] == pytest.approx(res["mIoU"]) and ev["aAcc"] == pytest.approx(res["aAcc"])
    main(["eval", str(tmp_path / "seg"), "seg.eval_batch_size=8"])  # the run itself: its stored config
    ev2 = json.loads((tmp_path / "seg_eval" / "results.json").read_text())
    assert ev2["mIoU"] == pytest.approx(res["mIoU"])
    assert _main(["predict", SCENES, *TINY[:-1], f"model.pretrained={tmp_path / 'seg'}",
                  "--out", str(tmp_path / "p.png"), "--num", "3"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ reproduce
def test_scenes_driver_plans_a_controlled_pair_and_skips_finished_stages(tmp_path, monkeypatch, fake_stage_runner):
    import beit.experiments.fmnist_scenes as rs

    stages = rs.plan_scenes(tmp_path, "full")
    assert [s.name for s in stages] == ["pretrain", "segment_pretrained", "segment_scratch"]
    pre, scratch = stages[1], stages[2]
    assert f"model.pretrained={tmp_path / 'pretrain'}" in pre.overrides and "model.pretrained=null" in scratch.overrides
    strip = lambda s: [o for o in s.overrides if not o.startswith(("model.pretrained=", "train.run_name="))]  # noqa
    assert strip(pre) == strip(scratch)
    for s in stages:
        assert load_config(s.config, s.overrides).train.run_name == s.name
    given = rs.plan_scenes(tmp_path, "smoke", pretrained="runs/x")
    assert [s.name for s in given] == ["segment_pretrained", "segment_scratch"]

    def finish(command, cfg, d):
        if command == "pretrain":
            (d / "summary.json").write_text("{}")
            return
        miou = 60.0 if cfg.model.pretrained else 50.0
        (d / "results.json").write_text(json.dumps({"mIoU": miou, "mAcc": 70.0, "aAcc": 90.0, "steps": 4,
                                                    "per_class_iou": {"background": 95.0, "Bag": miou}}))

    calls = fake_stage_runner(finish)
    monkeypatch.setattr(rs, "_draw_predictions", lambda out, stages: None)
    results = rs.reproduce_scenes(tmp_path, "full")
    assert calls == ["pretrain", "segment_pretrained", "segment_scratch"]
    assert results["gain_mIoU"] == 10.0 and results["pending_stages"] == []
    assert "| pretrained | 60.00 | 70.00 | 90.00 | 95.00 | 60.00 |" in (tmp_path / "results.md").read_text()
    calls.clear()
    rs.reproduce_scenes(tmp_path, "full")
    assert calls == []
