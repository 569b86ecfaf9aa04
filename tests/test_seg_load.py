"""`beit.load`, `beit export`, `beit eval` and `beit predict` of segmenters from every source kind, and
`beit.load` of HF BEiT folders of sizes no preset has.

Every model is tiny and every parameter (BatchNorm statistics included) random, so that a swapped or
missing weight changes the logits; each source is compared with a model built and filled by hand (or with
the transformers model itself), never with another `beit.load`.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import beit
from beit.config import load_config
from beit.models.segmentation import BeitSegmenter, create_segmenter

transformers = pytest.importorskip("transformers")

# the random fill and fast init of the segmenter parity tests (fast_init is autouse here too)
from test_segmentation_model import fast_init, randomize_  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NAMES = ["sky", "road", "car", "tree"]
# A non-preset segmenter that HF's head can hold (neck x4, x2, x1, /2; UperNet channels = width).
ARCH = dict(img_size=64, embed_dim=32, depth=4, num_heads=2, num_classes=4, channels=32, aux_channels=16,
            out_indices=[0, 1, 2, 3], mlp_ratio=2.0)
PRESET = "beit_base_patch16_512_upernet"




def close(a, b, atol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def seg_folder(root):
    """root/{train,test}/{images,masks} (2 RGB images each, 4-class masks) and root/classes.txt."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(rng.integers(0, 4, (64, 64), dtype=np.uint8), "L").save(root / split / "masks" / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A `beit segment` run directory as training leaves it (checkpoint with config and class names), and the
    segmenter whose weights it holds, built by hand."""
    from beit.train import checkpoint as ckpt_io

    tmp = tmp_path_factory.mktemp("seg")
    data = seg_folder(tmp / "data")
    overrides = [f"model.{k}={json.dumps(v)}" for k, v in ARCH.items()]
    cfg = load_config("configs/segment/fmnist_scenes.yaml", [
        f"model.name={PRESET}", "model.pretrained=null", *overrides, "data.dataset=seg_folder", f"data.root={data}",
        "data.in_chans=3", "data.mean=[0.4,0.5,0.6]", "data.std=[0.2,0.25,0.3]", "data.num_workers=0",
        "seg.scale=[64,64]", "seg.eval_batch_size=2", f"train.out_dir={tmp / 'runs'}", "train.run_name=seg"])
    ref = randomize_(create_segmenter(PRESET, **ARCH), seed=1)
    run = tmp / "runs" / "seg"
    run.mkdir(parents=True)
    ckpt_io.save_training_checkpoint(run, {"model": ref.state_dict(), "config": cfg.to_dict(),
                                           "class_names": NAMES}, 8, 1)
    return run, ref


def _main(argv):
    from beit.cli import main

    try:
        main(argv)
    except SystemExit as e:  # commands that return a path end without one
        return e.code
    return 0


# ------------------------------------------------------------------------------------------------ beit.load
def test_load_a_segmenter_from_its_run_its_checkpoint_and_its_hf_export(seg_run, tmp_path):
    run, ref = seg_run
    assert _main(["export", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)  # [2, 4, 16, 16]
    for kind, src in {"run": run, "ckpt": run / "ckpt-00000008.pt", "hf export": tmp_path / "hf"}.items():
        model = beit.load(src)
        assert isinstance(model, BeitSegmenter) and not model.training, kind
        assert model.out_indices == [0, 1, 2, 3] and model.depth == 4, kind
        assert model.class_names == NAMES, kind
        assert model.beit_config.data.dataset == "seg_folder", kind
        with torch.no_grad():
            close(model(x), want)


def test_a_segmenter_without_its_config_or_with_contradicting_overrides_is_refused(seg_run, tmp_path):
    from beit.config import ConfigError

    run, ref = seg_run
    torch.save({"model": ref.state_dict()}, tmp_path / "bare.pth")  # nothing says which blocks the neck reads
    with pytest.raises(ValueError, match="out_indices"):
        beit.load(tmp_path / "bare.pth")
    with pytest.raises(ConfigError, match=r"model.out_indices=\[1, 2, 3, 3\] \(checkpoint: \[0, 1, 2, 3\]\)"):
        beit.load(run, out_indices=[1, 2, 3, 3])
    assert beit.load(run, out_indices=[0, 1, 2, 3], channels=32).depth == 4  # restating is fine


def tiny_hf_segmenter(seed=0):
    """HF BeitForSemanticSegmentation no preset has: patch 8, 5 layers, out_indices [2, 3, 4, 5], mlp x1.5."""
    cfg = transformers.BeitConfig(image_size=64, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=5,
                                  num_attention_heads=2, intermediate_size=48, use_relative_position_bias=True,
                                  out_indices=[2, 3, 4, 5], num_labels=3, auxiliary_channels=16,
                                  id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    return randomize_(transformers.BeitForSemanticSegmentation(cfg), seed)


def test_load_an_hf_semantic_segmentation_folder_of_a_size_no_preset_has(tmp_path):
    hf = tiny_hf_segmenter(seed=2)
    hf.save_pretrained(tmp_path / "hf")
    model = beit.load(tmp_path / "hf")
    m = model.beit_config.model
    # HF reads hidden_states[i - 1]: out_indices [2, 3, 4, 5] are blocks 0..3; transformers' eps is 1e-12
    assert (m.patch_size, m.depth, m.out_indices, m.layer_norm_eps, m.mlp_ratio) == (8, 5, [0, 1, 2, 3], 1e-12, 1.5)
    assert model.class_names == ["a", "b", "c"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = hf(pixel_values=x).logits  # [2, 3, 32, 32]
        close(model(x), want)
        # ... and out again: `beit export` of the loaded folder is an HF folder with the same logits
        again = beit.export.export(tmp_path / "hf", tmp_path / "out", "hf")
        back = transformers.AutoModelForSemanticSegmentation.from_pretrained(again).eval()
        close(back(pixel_values=x).logits, want)


# ------------------------------------------------------------------------------------------------ beit export
def test_export_a_segmentation_run_for_transformers(seg_run, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    run, ref = seg_run
    assert _main(["export", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    model, info = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == "BeitForSemanticSegmentation"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert [model.config.id2label[i] for i in range(4)] == NAMES and model.config.label2id["car"] == 2
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    image = Image.open(sorted((run.parent.parent / "data" / "test" / "images").glob("*.png"))[0])
    pixels = processor(image, return_tensors="pt")["pixel_values"]  # [1, 3, 64, 64]
    # the run's normalisation, written out by hand (the image is already the crop size: no resize)
    by_hand = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
               - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    close(pixels[0], by_hand, atol=1e-5)
    with torch.no_grad():
        close(model.eval()(pixel_values=pixels).logits, ref(pixels))
    code = _main(["export", str(run), str(tmp_path / "timm"), "--to", "timm"])
    assert code == 2 and not (tmp_path / "timm").exists()


def test_export_refuses_a_head_hf_cannot_hold_and_keeps_the_folder(seg_run, tmp_path, capsys):
    from beit.train import checkpoint as ckpt_io

    cfg = load_config("configs/segment/fmnist_scenes.yaml")  # patch 4, neck x2, x1, /2, /4
    run = tmp_path / "scenes"
    run.mkdir()
    model = create_segmenter(cfg.model.name, **cfg.model.overrides())
    ckpt_io.save_training_checkpoint(run, {"model": model.state_dict(), "config": cfg.to_dict()}, 1, 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert _main(["export", str(run), str(tmp_path / "out"), "--to", "hf", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not representable in HF" in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "out" / "keep.txt").exists()  # --overwrite replaces only once there is something to write


# ------------------------------------------------------------------------------------------------ eval, predict
def test_eval_and_predict_read_the_run_and_its_hf_export_alike(seg_run, tmp_path):
    run, _ = seg_run
    assert _main(["export", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    for name, src in (("run", run), ("hf", tmp_path / "hf")):
        assert _main(["eval", str(src), f"train.out_dir={tmp_path}", f"train.run_name={name}_eval"]) == 0
        assert _main(["predict", str(src), "--out", str(tmp_path / f"{name}.png"), "--num", "2"]) == 0
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    a, b = (json.loads((tmp_path / f"{n}_eval" / "results.json").read_text()) for n in ("run", "hf"))
    assert a["num_images"] == b["num_images"] == 2
    assert a["per_class_iou"] == pytest.approx(b["per_class_iou"], abs=1e-6)


# ------------------------------------------------------------------------------------------------ HF classifiers
@pytest.mark.parametrize("kind", ["classifier", "mim"])
def test_load_an_hf_beit_folder_whose_patch_size_and_depth_no_preset_has(tmp_path, kind):
    mim = kind == "mim"
    cfg = transformers.BeitConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, intermediate_size=48, num_labels=3, use_mask_token=mim,
                                  use_relative_position_bias=not mim, use_shared_relative_position_bias=mim)
    cls = transformers.BeitForMaskedImageModeling if mim else transformers.BeitForImageClassification
    hf = randomize_(cls(cfg), seed=3)
    hf.save_pretrained(tmp_path / "hf")
    model = beit.load(tmp_path / "hf")
    m = model.beit_config.model
    assert (m.patch_size, m.depth, m.embed_dim, m.mlp_ratio, m.layer_norm_eps) == (8, 3, 32, 1.5, 1e-12)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if mim:
            mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.4
            close(model(x, mask), hf(pixel_values=x, bool_masked_pos=mask).logits[mask])
        else:
            close(model(x), hf(pixel_values=x).logits)


def test_segmentation_head_fields_on_a_classifier_preset_are_refused():
    with pytest.raises(ValueError, match=r"model.out_indices sets a segmentation head; 'beit_tiny_patch16_224' is not"):
        beit.create_model("beit_tiny_patch16_224", out_indices=[0, 1, 2, 3])
