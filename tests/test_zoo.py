"""The model zoo: names resolve to shipped safetensors files that describe themselves (written by
scripts/make_zoo.py), and the shipped weights reproduce the accuracy docs/model_zoo.md documents."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

import beit
from beit import hub
from beit.config import load_config
from beit.builders import create_model
from beit.train import checkpoint as ckpt_io
from beit.train.runner import run_dir_of

FMNIST = "/usr/share/datasets/fashion-mnist"
ROOT = Path(__file__).resolve().parent.parent


def make_zoo_module():
    spec = importlib.util.spec_from_file_location("make_zoo", ROOT / "scripts" / "make_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_run(tmp: Path, cfg_path: str, seed: int) -> tuple[Path, torch.nn.Module]:
    cfg = load_config(cfg_path, ["model.depth=2", "model.embed_dim=32", "model.num_heads=2"])
    torch.manual_seed(seed)
    model = create_model(cfg.model.name, **cfg.model.overrides())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    tmp.mkdir()
    ckpt_io.save_training_checkpoint(tmp, {"model": model.state_dict(), "config": cfg.to_dict()}, 1, 1)
    return tmp, model.eval()


def test_zoo_names_resolve_to_self_describing_fp16_files(tmp_path, monkeypatch):
    """The API on tiny stand-in files written by make_zoo's own writer (the real weights are not needed)."""
    mk = make_zoo_module()
    pt_run, mim = tiny_run(tmp_path / "pt", "configs/pretrain/fmnist_quick.yaml", 0)
    ft_run, clf = tiny_run(tmp_path / "ft", "configs/finetune/fmnist.yaml", 1)
    files = {"fmnist-backbone": mk.write_asset(str(pt_run), tmp_path / "b.safetensors", "mim"),
             "fmnist-classifier": mk.write_asset(str(ft_run), tmp_path / "c.safetensors", "classifier")}
    monkeypatch.setattr(hub, "ZOO", files)
    with pytest.raises(SystemExit, match="expected a classifier"):
        mk.write_asset(str(pt_run), tmp_path / "x.safetensors", "classifier")

    x = torch.randn(2, 1, 32, 32)
    model = beit.load("fmnist-classifier")
    assert model.class_names[0] == "T-shirt/top" and model.beit_config.model.depth == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), clf.half().float()(x))  # fp16 storage, fp32 compute
    backbone = beit.load("fmnist-backbone")
    assert backbone.tokenizer_name == "fmnist_dvae"
    # create_model(..., pretrained="fmnist"): the backbone under a classifier preset (shared table cloned)
    ft = create_model("beit_fmnist_patch4_32", pretrained="fmnist", depth=2, embed_dim=32, num_heads=2)
    assert torch.equal(ft.blocks[1].attn.relative_position_bias_table,
                       mim.rel_pos_bias.relative_position_bias_table.half().float())
    same = create_model("beit_fmnist_patch4_32", pretrained="fmnist-backbone", depth=2, embed_dim=32, num_heads=2)
    assert torch.equal(same.blocks[0].mlp.fc1.weight, ft.blocks[0].mlp.fc1.weight)  # zoo names work too


def test_missing_zoo_file_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "ZOO", {"fmnist-classifier": tmp_path / "absent.safetensors"})
    with pytest.raises(FileNotFoundError, match="make_zoo.py"):
        beit.load("fmnist-classifier")


def documented_top1(name: str) -> float:
    text = re.sub(r"<!--.*?-->", "", (ROOT / "docs" / "model_zoo.md").read_text())  # render_docs.py's markers
    row = re.search(rf"^\| `{re.escape(name)}` \|.*\| ([\d.]+) \|$", text, re.M)
    assert row, f"docs/model_zoo.md has no row for {name}"
    return float(row.group(1))


@pytest.mark.skipif(not hub.ZOO["fmnist-classifier"].is_file(), reason="zoo weights not shipped in this checkout")
@pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST not installed")
def test_shipped_classifier_reproduces_its_documented_accuracy(tmp_path):
    """beit eval on the full Fashion-MNIST test split (10,000 images) within 0.1 pp of the documented top-1."""
    from beit.hub import command_config
    from beit.train.eval_task import run_eval

    cfg = command_config("fmnist-classifier", [f"train.out_dir={tmp_path}", "data.eval_subset=null",
                                               "data.num_workers=0", "train.progress=false"], "eval")
    res = json.loads((run_eval(cfg) / "results.json").read_text())
    assert res["num_samples"] == 10_000
    assert abs(res["top1"] - documented_top1("fmnist-classifier")) <= 0.1, res["top1"]


@pytest.mark.skipif(not all(p.is_file() for p in hub.ZOO.values()), reason="zoo weights not shipped in this checkout")
def test_shipped_files_are_the_runs_docs_name():
    """Each shipped file's stored config is the run docs/model_zoo.md says it is: a file written from the wrong
    run (or left stale when the docs moved on) fails here, not in a user's hands."""
    def results(path: str) -> dict:
        return json.loads((ROOT / "docs" / "results" / path).read_text())

    assert all(p.stat().st_size <= 6 * 2**20 for p in hub.ZOO.values())
    backbone, backbone_4ep, clf = (beit.load(n).beit_config for n in ("fmnist-backbone", "fmnist-backbone-4ep",
                                                                     "fmnist-classifier"))
    assert backbone.train.epochs == results("fmnist_study_20ep/pretrain_summary.json")["epochs"]
    assert Path(results("fmnist_study_20ep/results.json")["study"]["pretrained"]) == run_dir_of(backbone)
    assert backbone_4ep.train.epochs == results("fmnist_full_rerun/results.json")["pretrain"]["epochs"]
    # the classifier: the 100%-label study's run at the pretrained arm's validation-selected point, fine-tuned
    # from fmnist-backbone on the 55,000 labels outside the validation split
    full = results("fmnist_study_20ep_full/results.json")
    selected = full["rows"]["100pct"]["arms"]["pretrained"]["selected"]
    assert Path(clf.model.pretrained) == run_dir_of(backbone) == Path(full["study"]["pretrained"])
    assert (clf.optim.lr, clf.optim.layer_decay) == (selected["optim.lr"], selected["optim.layer_decay"])
    assert (clf.data.label_fraction, clf.data.val_size, clf.train.seed) == (1.0, 5000, 0)
