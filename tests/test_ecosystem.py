"""Self-describing checkpoints (`beit.load`), exports that HF transformers and timm load unchanged, the auto
export at the end of a run, `beit plot`, `--version`, and the README's "use it elsewhere" lines as written.

Data: a 3-class colour ImageFolder (train/ + val/) generated here; a 2-block, 32-wide model trained for 18
steps reaches 100% on it, which is beside the point: every check compares two paths to the same weights.
"""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import beit
from beit.config import ConfigError, load_config
from beit.models import create_model

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TINY_MODEL = dict(in_chans=3, depth=2, embed_dim=32, num_heads=2, num_classes=3)
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_folder(root: Path, per_class: dict[str, int], gray: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name, c in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(c)[None, None] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                pil = Image.fromarray(img)
                (pil.convert("L") if gray else pil).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished fine-tuning run (2 epochs, 18 steps, ~2 s) with its automatic export."""
    from beit.tasks import run

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("eco")
    data = make_folder(tmp / "data", {"train": 24, "val": 6})
    model = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    cfg = load_config("configs/finetune/fmnist_scratch.yaml", model + [
        "model.name=beit_fmnist_patch4_32", "data.dataset=image_folder", f"data.root={data}", "data.in_chans=3",
        "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "data.batch_size=8", "data.num_workers=0",
        "data.mixup=0", "data.cutmix=0", "data.auto_augment=null", "data.reprob=0", "train.epochs=2",
        "train.progress=false", f"train.out_dir={tmp / 'runs'}", "train.run_name=ft", "optim.warmup_epochs=0",
        "optim.layer_decay=null"])
    return run("finetune", cfg)


def reference(run_dir: Path) -> torch.nn.Module:
    """The run's final weights in a model built by hand (not through beit.load)."""
    ckpt = torch.load(sorted(run_dir.glob("ckpt-*.pt"))[-1], weights_only=True)
    model = create_model("beit_fmnist_patch4_32", **TINY_MODEL)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def sources(run: Path, tmp: Path) -> dict[str, Path]:
    """Every kind of source `beit.load` reads, made from the same weights."""
    from beit.convert import save_checkpoint_as

    sd = reference(run).state_dict()
    torch.save({"model": sd}, tmp / "official.pth")
    save_checkpoint_as(sd, tmp / "mmpretrain.pth", "mmpretrain")
    save_checkpoint_as(sd, tmp / "hf_plain", "hf")  # an HF folder that knows nothing about beit
    return {"run_dir": run, "ckpt": sorted(run.glob("ckpt-*.pt"))[-1], "export_hf": run / "export" / "hf",
            "export_timm": run / "export" / "timm", "official": tmp / "official.pth",
            "mmpretrain": tmp / "mmpretrain.pth", "hf_plain": tmp / "hf_plain"}


# ------------------------------------------------------------------------------------------------ beit.load
def test_load_round_trips_every_source_kind(run, tmp_path):
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = reference(run)(x)
    for kind, src in sources(run, tmp_path).items():
        model = beit.load(src)
        assert not model.training, kind
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0, msg=kind)
        assert model.beit_config.model.name == "beit_fmnist_patch4_32", kind
        if kind not in ("official", "mmpretrain", "hf_plain"):  # these carry no labels
            assert model.class_names == ["blue", "green", "red"], kind
    best = beit.load(run / "best.pt")  # the best evaluation's weights: same architecture, stored config
    assert best.beit_config.data.root == load_config(run / "config.yaml").data.root


def test_load_mim_model_keeps_its_tokenizer_and_exports(tmp_path):
    from transformers import BeitForMaskedImageModeling

    from beit.export import export
    from beit.train import checkpoint as ckpt_io

    cfg = load_config("configs/pretrain/fmnist_quick.yaml", ["model.depth=2", "model.embed_dim=32", "model.num_heads=2"])
    mim = create_model(cfg.model.name, **cfg.model.overrides())
    with torch.no_grad():
        for p in mim.parameters():
            p.normal_(0, 0.1)
    ckpt_io.save_training_checkpoint(tmp_path, {"model": mim.state_dict(), "config": cfg.to_dict()}, 5, 1)
    loaded = beit.load(tmp_path)
    assert loaded.tokenizer_name == cfg.tokenizer.name == "fmnist_dvae" and loaded.lm_head is not None
    x, mask = torch.randn(2, 1, 32, 32), torch.rand(2, 64) < 0.4
    with torch.no_grad():
        want = mim.eval()(x, mask)  # [num_masked, vocab]
        torch.testing.assert_close(loaded(x, mask), want)
        hf = BeitForMaskedImageModeling.from_pretrained(export(tmp_path, tmp_path / "hf", "hf")).eval()
        # the gray model is exported with 3 channels: gray RGB input gives the 1-channel outputs
        got = hf(pixel_values=x.repeat(1, 3, 1, 1), bool_masked_pos=mask).logits[mask]  # [B, N, vocab]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        tm = timm.create_model(f"local-dir:{export(tmp_path, tmp_path / 'timm', 'timm')}", pretrained=True).eval()
        torch.testing.assert_close(tm.forward_features(x), mim.forward_features(x), atol=1e-5, rtol=0)


def test_overrides_that_contradict_the_checkpoint_are_errors(run, tmp_path):
    from beit.hub import command_config

    with pytest.raises(ConfigError, match=r"model.depth=4 \(checkpoint: 2\)"):
        command_config(str(run), ["model.depth=4"], "eval")
    with pytest.raises(ConfigError, match="model.embed_dim"):
        beit.load(run, embed_dim=64)
    cfg = command_config(str(run), ["model.depth=2", "data.batch_size=4"], "eval")  # restating is fine
    assert cfg.data.batch_size == 4 and cfg.train.run_name == "ft_eval" and cfg.model.embed_dim == 32
    yaml_cfg = tmp_path / "knn.yaml"
    yaml_cfg.write_text(f"model:\n  name: beit_fmnist_patch4_32\n  pretrained: {run}\n")
    with pytest.raises(ConfigError, match="model.embed_dim=192"):  # the preset's width, not the checkpoint's
        command_config(str(yaml_cfg), [], "knn")
    with pytest.raises(FileNotFoundError, match="fmnist-classifier"):
        beit.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------ HF
def _eval_transform(model):
    from beit.data import build_finetune_transform

    return build_finetune_transform(model.beit_config.data, train=False)


def eval_predictions(model, folder: Path) -> dict[str, int]:
    tf = _eval_transform(model)
    files = sorted(folder.glob("*/*.png"))
    with torch.no_grad():
        logits = model(torch.stack([tf(Image.open(f)) for f in files]))
    return {str(f): int(i) for f, i in zip(files, logits.argmax(-1))}


def test_hf_export_loads_through_the_three_entry_points(run, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from beit.cli import main

    hf_dir = run / "export" / "hf"
    val = Path(load_config(run / "config.yaml").data.root) / "val"
    ours = eval_predictions(beit.load(run), val)
    # beit eval on the same images (the val/ split), straight from the run directory
    main(["eval", str(run), f"train.out_dir={tmp_path}"])
    res = json.loads((tmp_path / "ft_eval" / "results.json").read_text())
    labels = {str(f): ["blue", "green", "red"].index(f.parent.name) for f in val.glob("*/*.png")}
    assert res["top1"] == pytest.approx(100 * np.mean([ours[f] == labels[f] for f in ours]))

    model = AutoModelForImageClassification.from_pretrained(hf_dir).eval()
    processor = AutoImageProcessor.from_pretrained(hf_dir)
    classify = pipeline("image-classification", model=str(hf_dir), top_k=3)
    names = model.config.id2label
    assert [names[i] for i in range(3)] == ["blue", "green", "red"]
    # the preprocessing fields read back are the run's (mean/std 0.5, eval resize 32 / crop_pct, crop 32)
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and list(processor.image_std) == [0.5, 0.5, 0.5]
    assert processor.crop_size == {"height": 32, "width": 32} and processor.do_center_crop
    ref = beit.load(run)
    tf = _eval_transform(ref)
    for f, want in ours.items():
        with torch.no_grad():
            pixels = processor(Image.open(f).convert("RGB"), return_tensors="pt")["pixel_values"]
            torch.testing.assert_close(pixels[0], tf(Image.open(f)), atol=1e-5, rtol=0, msg=f)
            logits = model(pixel_values=pixels).logits  # [1, 3]
            torch.testing.assert_close(logits, ref(tf(Image.open(f))[None]), atol=1e-4, rtol=0, msg=f)
        assert logits.argmax(-1).item() == want, f
        probs = logits.softmax(-1)[0]
        got = {r["label"]: r["score"] for r in classify(f)}
        assert got == pytest.approx({names[i]: probs[i].item() for i in range(3)}, abs=1e-5), f


def test_gray_model_through_the_hf_pipeline(tmp_path):
    """A 1-channel model: HF's pipeline converts images to RGB; the 3-channel export gives the same logits."""
    from transformers import pipeline

    from beit.export import export
    from beit.train import checkpoint as ckpt_io

    data = make_folder(tmp_path / "gray", {"train": 1, "test": 2}, gray=True)
    cfg = load_config("configs/finetune/fmnist.yaml", ["model.depth=2", "model.embed_dim=32", "model.num_heads=2",
                                                        "model.num_classes=3", "data.dataset=image_folder",
                                                        f"data.root={data}"])
    model = create_model(cfg.model.name, **cfg.model.overrides()).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    ckpt_io.save_training_checkpoint(tmp_path, {"model": model.state_dict(), "config": cfg.to_dict()}, 1, 1)
    classify = pipeline("image-classification", model=str(export(tmp_path, tmp_path / "hf", "hf")), top_k=3)
    ours = beit.load(tmp_path)
    tf = _eval_transform(ours)
    for f, want in eval_predictions(ours, data / "test").items():
        got = classify(f)
        assert got[0]["label"] == ["blue", "green", "red"][want], f
        with torch.no_grad():
            probs = ours(tf(Image.open(f))[None]).softmax(-1)[0]  # the 1-channel model on the gray image
        assert {r["label"]: r["score"] for r in got} == pytest.approx(
            {name: probs[i].item() for i, name in enumerate(["blue", "green", "red"])}, abs=1e-5), f


# ------------------------------------------------------------------------------------------------ timm
def test_timm_export_identical_logits_and_head_kept(run):
    timm_dir = run / "export" / "timm"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = reference(run)(x)
        model = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval()
        assert model.num_classes == 3
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
        cfg = json.loads((timm_dir / "config.json").read_text())
        model = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=dict(
            file=str(timm_dir / "model.safetensors"), **cfg["pretrained_cfg"]), **cfg["model_args"]).eval()
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(data_cfg["input_size"]) == (3, 32, 32) and data_cfg["interpolation"] == "bicubic"
    assert cfg["pretrained_cfg"]["label_names"] == ["blue", "green", "red"]


def test_export_never_overwrites(run, tmp_path):
    from beit.export import export

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(run, tmp_path / "out", "hf")
    assert (tmp_path / "out" / "keep.txt").is_file()


def test_readme_use_it_elsewhere_runs_as_written(run, tmp_path, monkeypatch):
    text = Path("README.md").read_text()
    section = text.split("## Use it elsewhere", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "runs").mkdir()
    os.symlink(run, tmp_path / "runs" / "my_run")
    shutil.copy(next((Path(load_config(run / "config.yaml").data.root) / "val" / "red").glob("*.png")),
                tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own lines
    assert scope["model"].num_classes == 3 and not scope["model"].training


# ------------------------------------------------------------------------------------------------ plot, version
def test_plot_overlays_runs(run, tmp_path):
    from beit.plot import plot_runs

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run / "metrics.jsonl", other / "metrics.jsonl")
    out = plot_runs([run, other], tmp_path / "curves.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path / "nothing"], tmp_path / "x.png")


def test_version(capsys):
    from beit.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"beit {beit.__version__}"


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("preset", ["beit_fmnist_patch4_32", "beit_fmnist_patch4_32_512_vocab"])
def test_last_block_attention_is_what_the_block_computes(preset):
    """attn @ v through the block's output projection must give the block's own attention output, so the
    maps include the rel-pos bias (per-layer tables, or the shared table of MIM models)."""
    from beit.attention import last_block_attention

    torch.manual_seed(0)
    model = create_model(preset, depth=2, embed_dim=32, num_heads=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1)  # zero at init: make the bias matter
        x = torch.randn(2, 1, 32, 32)
        attn = last_block_attention(model, x)  # [B, H, N+1, N+1]
        assert attn.shape == (2, 2, 65, 65)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 65))
        tokens = model.get_intermediate_layers(x)[-2]
        blk = model.blocks[-1]
        h = blk.norm1(tokens)
        v = torch.nn.functional.linear(h, blk.attn.qkv.weight[64:], blk.attn.v_bias).view(2, 65, 2, 16).transpose(1, 2)
        ours = blk.attn.proj((attn @ v).transpose(1, 2).reshape(2, 65, 32))
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        torch.testing.assert_close(ours, blk.attn(h, shared), atol=1e-5, rtol=0)


def test_predict_attention_png(run, tmp_path):
    from beit.cli import main

    out = tmp_path / "attn.png"
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), "--attention", "--num", "2", "--out", str(out)])
    assert e.value.code == 0
    assert out.stat().st_size > 5_000


def test_linprobe_from_a_checkpoint_uses_the_probe_recipe(run):
    from beit.hub import command_config

    probe = load_config("configs/linprobe/fmnist.yaml")
    cfg = command_config(str(run), ["train.epochs=2"], "linprobe")
    assert cfg.optim == probe.optim and cfg.train.epochs == 2 and cfg.data.batch_size == probe.data.batch_size
    assert cfg.train.run_name == "ft_linprobe" and cfg.data.root == load_config(run / "config.yaml").data.root


def test_knn_and_export_commands_need_only_the_run(run, tmp_path):
    from beit.cli import main

    main(["knn", str(run), f"train.out_dir={tmp_path}", "train.knn_k=3"])
    res = json.loads((tmp_path / "ft_knn" / "results.json").read_text())
    assert res["top1"] > 50.0  # 3 colour classes, trained features; chance is 33%
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), str(tmp_path / "t"), "--to", "timm"])
    assert e.value.code == 0 and (tmp_path / "t" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:  # a non-empty destination is refused with one line
        main(["export", str(run), str(tmp_path / "t"), "--to", "timm"])
    assert e.value.code == 2


def test_auto_export_is_configurable(run):
    from beit.export import export_run

    assert sorted(p.name for p in (run / "export").iterdir()) == ["hf", "timm"]  # the default, after fit
    cfg = load_config(run / "config.yaml", ["train.export=[]"])
    assert export_run(cfg, run) == []
    with pytest.raises(ConfigError, match="train.export"):
        load_config(None, ["train.export=[onnx]"])
