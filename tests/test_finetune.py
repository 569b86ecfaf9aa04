"""Fine-tuning and evaluation: layer-decay groups, weight-decay membership, smoke runs of finetune / linprobe /
knn / eval on Fashion-MNIST subsets with a 2-block model, and the bad-input errors."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
import yaml

from beit.config import ConfigError, OptimConfig, load_config
from beit.models import create_model
from beit.train.loop import param_groups

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

OFFICIAL_B_065 = [0.003697, 0.005688, 0.008751, 0.013463, 0.020712, 0.031864, 0.049022, 0.075419, 0.116029,
                  0.178506, 0.274625, 0.4225, 0.65, 1.0]

# A 2-block, 64-wide version of the Fashion-MNIST classifier on 512 training / 500 test images.
TINY = ("model.depth=2 model.embed_dim=64 model.num_heads=2 data.train_subset=512 data.eval_subset=500 "
        "data.batch_size=32 data.num_workers=0 train.progress=false train.log_every=8").split()


# Two cores shared with other jobs: OpenMP spin-waiting with 2 threads is ~40x slower than 1 thread here.
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def expected_layer(name: str, depth: int) -> int:
    if name.split(".")[0] in ("cls_token", "mask_token", "pos_embed", "patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1  # rel_pos_bias (shared), norm, fc_norm, head, lm_head


# ------------------------------------------------------------------------------------------------ layer decay
def test_layer_decay_gives_the_14_official_scales_and_groups():
    model = create_model("beit_base_patch16_224")
    groups = param_groups(model, OptimConfig(layer_decay=0.65))
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == pytest.approx(OFFICIAL_B_065, abs=1e-6)
    seen = set()
    for g in groups:
        for name in g["param_names"]:
            lid = expected_layer(name, 12)
            assert g["lr_scale"] == pytest.approx(OFFICIAL_B_065[lid], abs=1e-6), name
            assert g["name"].startswith(f"layer_{lid}_"), name
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}  # every parameter in exactly one group
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.003697, abs=1e-6)
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.005688, abs=1e-6)
    assert by_name["blocks.11.mlp.fc2.weight"]["lr_scale"] == pytest.approx(0.65)
    assert by_name["head.weight"]["lr_scale"] == by_name["fc_norm.weight"]["lr_scale"] == 1.0


def test_shared_rel_pos_table_is_top_layer_and_weight_decay_membership():
    # A narrow 12-block MIM model: shared rel-pos table, mask token, abs pos_embed (names are what matter).
    model = create_model("beit_base_patch16_224_8k_vocab", embed_dim=48, num_heads=2, vocab_size=16,
                         use_abs_pos_emb=True)

    def membership(**kw):
        groups = param_groups(model, OptimConfig(layer_decay=0.65, weight_decay=0.05, **kw))
        return {n: g for g in groups for n in g["param_names"]}

    g = membership()
    table = "rel_pos_bias.relative_position_bias_table"
    assert g[table]["lr_scale"] == 1.0 and g[table]["name"] == "layer_13_decay"
    assert g["mask_token"]["lr_scale"] == g["pos_embed"]["lr_scale"] == pytest.approx(0.65 ** 13)
    for name, p in model.named_parameters():
        official_no_decay = p.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
        assert (g[name]["weight_decay"] == 0.0) == official_no_decay, name
    assert g["mask_token"]["weight_decay"] == 0.05 and g[table]["weight_decay"] == 0.05  # official: decayed
    assert g["blocks.0.attn.q_bias"]["weight_decay"] == 0.0 and g["blocks.0.gamma_1"]["weight_decay"] == 0.0
    assert membership(decay_mask_token=False)["mask_token"]["weight_decay"] == 0.0
    assert membership(decay_rel_pos_bias=False)[table]["weight_decay"] == 0.0
    # per-layer tables (classifier) follow the same switch
    clf = create_model("beit_fmnist_patch4_32", depth=2)
    on = {n: g for g in param_groups(clf, OptimConfig()) for n in g["param_names"]}
    off = {n: g for g in param_groups(clf, OptimConfig(decay_rel_pos_bias=False)) for n in g["param_names"]}
    key = "blocks.1.attn.relative_position_bias_table"
    assert on[key]["weight_decay"] > 0 and off[key]["weight_decay"] == 0.0


# ------------------------------------------------------------------------------------------------ units
def test_knn_classify_weighted_vote():
    from beit.train.knn import knn_classify

    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 5
    train_y, test_y = torch.arange(4).repeat(25), torch.arange(4).repeat(5)
    train_x = centers[train_y] + torch.randn(100, 16)
    test_x = centers[test_y] + torch.randn(20, 16)
    res = knn_classify(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    res = knn_classify(train_x, train_y, test_x, (test_y + 1) % 4, k=20, temperature=0.07)
    assert res["top1"] == 0.0  # the vote really follows the neighbours' labels


def test_mixup_step_needs_pairs():
    from beit.train.finetune import build_mixup, make_classification_step

    cfg = load_config(None, ["data.mixup=0.8", "data.cutmix=1.0", "data.batch_size=7"])
    with pytest.raises(ConfigError, match="even data.batch_size"):
        build_mixup(cfg, 10)
    cfg.data.batch_size = 8
    step = make_classification_step(build_mixup(cfg, 10), 0.1)
    model = create_model("beit_fmnist_patch4_32", depth=1, embed_dim=32, num_heads=2)
    x, y = torch.randn(7, 1, 32, 32), torch.randint(0, 10, (7,))  # odd: a bad file was dropped
    np.random.seed(123)
    outer = np.random.get_state()[1].copy()
    out = step(model, (x, y))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert (np.random.get_state()[1] == outer).all()  # the caller's numpy RNG is untouched
    # the mixup draw follows torch's RNG (what checkpoints save), not numpy's global state
    losses = []
    for np_seed in (1, 2):
        torch.manual_seed(0)
        np.random.seed(np_seed)
        losses.append(step(model, (x.clone(), y))["loss"].item())  # timm mixes in place
    assert losses[0] == losses[1]


def test_fmnist_scratch_is_the_same_recipe():
    pre = yaml.safe_load(open("configs/finetune/fmnist.yaml"))
    scratch = yaml.safe_load(open("configs/finetune/fmnist_scratch.yaml"))
    assert pre["model"].pop("pretrained") and scratch["model"].pop("pretrained") is None
    assert pre["train"].pop("run_name") != scratch["train"].pop("run_name")
    assert pre == scratch
    for path in ("configs/finetune/beit_base_p16_in1k.yaml", "configs/finetune/beit_large_p16_in1k.yaml",
                 "configs/linprobe/fmnist.yaml", "configs/knn/fmnist.yaml"):
        load_config(path)  # valid keys and values


def test_register_adds_the_four_commands():
    from beit.cli.train import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for cmd in ("finetune", "linprobe", "knn", "eval"):
        args = parser.parse_args([cmd, "configs/finetune/fmnist.yaml", "optim.lr=1e-4", "--overwrite"])
        assert args.overwrite and args.overrides == ["optim.lr=1e-4"] and callable(args.func)


# ------------------------------------------------------------------------------------------------ bad input
@needs_fmnist
def test_checkpoint_of_another_size_names_the_tensor(tmp_path):
    from beit.train.finetune import build_finetune_task

    other = create_model("beit_fmnist_patch4_32", depth=2, embed_dim=32, num_heads=2)
    torch.save({"model": other.state_dict()}, tmp_path / "small.pt")
    cfg = load_config("configs/finetune/fmnist.yaml", TINY + [f"model.pretrained={tmp_path / 'small.pt'}"])
    with pytest.raises(ValueError, match=r"shape mismatch for '[\w.]+': checkpoint \[[\d, ]*32[\d, ]*\] vs "
                                         r"model \[[\d, ]*64[\d, ]*\]"):
        build_finetune_task(cfg, torch.device("cpu"))


@needs_fmnist
def test_finetune_starts_from_a_pretraining_run_directory(tmp_path):
    from beit.train import checkpoint as ckpt_io
    from beit.train.finetune import build_finetune_task

    mim = create_model("beit_fmnist_patch4_32_512_vocab", depth=2, embed_dim=64, num_heads=2)
    with torch.no_grad():
        mim.rel_pos_bias.relative_position_bias_table.normal_()
    ckpt_io.save_training_checkpoint(tmp_path, {"model": mim.state_dict(), "optimizer": {}}, 7, 2)
    cfg = load_config("configs/finetune/fmnist.yaml", TINY + [f"model.pretrained={tmp_path}"])
    model = build_finetune_task(cfg, torch.device("cpu")).model
    for blk in model.blocks:  # the shared table was cloned into every layer
        assert torch.equal(blk.attn.relative_position_bias_table, mim.rel_pos_bias.relative_position_bias_table)
    assert torch.equal(model.blocks[1].mlp.fc1.weight, mim.blocks[1].mlp.fc1.weight)


@needs_fmnist
def test_label_fraction_that_empties_a_class_is_an_error():
    from beit.train.finetune import build_finetune_task

    cfg = load_config("configs/finetune/fmnist.yaml", TINY + ["model.pretrained=null", "data.label_fraction=5e-5"])
    with pytest.raises(ConfigError, match="keeps no sample of class"):
        build_finetune_task(cfg, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ smoke runs
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Fine-tune the tiny model from scratch: 6 epochs of 512 images (96 steps, ~5 s). Without pretraining the
    rel-pos tables start at zero and mean pooling makes the model a bag of patches, so it learns slowly: over
    seeds 0-3 this reaches 25-32% top-1 and ~89% top-5 (chance 10% / 50%)."""
    from beit.tasks import run

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/finetune/fmnist_scratch.yaml", TINY + [
        f"train.out_dir={out}", "train.epochs=6", "train.eval_every_epochs=3", "optim.warmup_epochs=0.5", "optim.lr=2e-3", "optim.clip_grad=1",
        "optim.layer_decay=null", "data.auto_augment=null", "data.reprob=0", "data.mixup=0", "data.cutmix=0"])
    return run("finetune", cfg)


@needs_fmnist
def test_finetune_smoke_learns(finetuned):
    results = json.loads((finetuned / "results.json").read_text())
    summary = json.loads((finetuned / "summary.json").read_text())
    assert summary["steps"] == 96
    assert results["top1"] > 15.0 and results["top5"] > 70.0, results  # chance: 10% / 50%
    assert results["best_top1"] >= results["top1"]
    assert (finetuned / "best.pt").is_file() and list(finetuned.glob("ckpt-*.pt"))
    evals = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["split"] == "eval"] == [48, 96]


@needs_fmnist
@pytest.mark.parametrize("cached", [True, False])
def test_linprobe_smoke_reports_every_layer(finetuned, tmp_path, cached):
    from beit.tasks import run
    from beit.train.linprobe import LinearProbe

    cfg = load_config("configs/linprobe/fmnist.yaml", TINY + [
        "model.name=beit_fmnist_patch4_32", f"model.pretrained={finetuned / 'best.pt'}", f"train.out_dir={tmp_path}",
        f"train.probe_cache_features={cached}", "train.epochs=4" if cached else "train.max_steps=4",
        "train.eval_every_epochs=2", "optim.lr=1e-2"])
    run_dir = run("linprobe", cfg)
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["per_layer_top1"]) == {"1", "2"} and res["best_layer"] in (1, 2)
    assert res["top1"] == max(res["per_layer_top1"].values())
    if cached:
        assert res["top1"] > 20.0, res
    # the backbone is frozen (not in the checkpoint's trainable set) and stays in eval mode while training
    probe = LinearProbe(create_model("beit_fmnist_patch4_32", depth=2, embed_dim=64, num_heads=2), 10).train()
    assert not probe.backbone.training and probe.heads[0].training
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == \
        [f"heads.{i}.{w}" for i in range(2) for w in ("weight", "bias")]


@needs_fmnist
def test_knn_smoke_above_chance(finetuned, tmp_path):
    from beit.train.knn import knn_evaluate, run_knn

    cfg = load_config("configs/knn/fmnist.yaml", TINY + [
        "model.name=beit_fmnist_patch4_32", f"model.pretrained={finetuned}", f"train.out_dir={tmp_path}"])
    res = json.loads((run_knn(cfg) / "results.json").read_text())
    assert res["top1"] > 20.0 and res["top5"] >= res["top1"], res
    # the periodic-signal entry point: a MIM model, in train mode, comes back in train mode
    torch.manual_seed(0)
    mim = create_model("beit_fmnist_patch4_32_512_vocab", depth=2, embed_dim=64, num_heads=2).train()
    out = knn_evaluate(mim, cfg)
    assert set(out) == {"knn_top1", "knn_top5"} and mim.training
    # random features keep the pixels' neighbourhoods: 34-37% top-1, 86-88% top-5 over init seeds 0-2 (chance
    # 10% / 50%); features paired with the wrong labels, or another model's, fall to chance
    assert out["knn_top1"] > 25.0 and out["knn_top5"] > 75.0, out


@needs_fmnist
def test_eval_writes_per_class_and_confusion(finetuned, tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from PIL import Image

    from beit.train.eval_task import run_eval

    figures = []  # the confusion figure, caught as it is saved
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    cfg = load_config("configs/finetune/fmnist.yaml", TINY + [
        f"model.pretrained={finetuned / 'best.pt'}", f"train.out_dir={tmp_path}", "train.run_name=eval"])
    run_dir = run_eval(cfg)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["num_samples"] == 500 and res["class_names"][0] == "T-shirt/top"
    assert sum(map(sum, res["confusion_matrix"])) == 500
    best = torch.load(finetuned / "best.pt", weights_only=True)
    assert res["top1"] == pytest.approx(best["top1"], abs=0.21)  # same weights, same test subset
    # confusion.png: that matrix, each cell's count written in it, coloured by the true class's recall
    (fig,) = figures
    ax = fig.axes[0]
    cm = np.array(res["confusion_matrix"])  # [true, predicted]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    assert [t.get_text() for t in ax.get_yticklabels()] == res["class_names"]
    counts = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text()) for t in ax.texts}
    assert counts == {(i, j): int(cm[i, j]) for i in range(10) for j in range(10)}
    np.testing.assert_allclose(ax.get_images()[0].get_array(), cm / cm.sum(1, keepdims=True), rtol=1e-6)
    assert Image.open(run_dir / "confusion.png").size == tuple(round(v * 120) for v in fig.get_size_inches())
    with pytest.raises(ConfigError, match="model.pretrained"):
        run_eval(load_config("configs/finetune/fmnist_scratch.yaml", TINY + [f"train.out_dir={tmp_path}"]))
    assert not (tmp_path / "fmnist_scratch").exists()  # no half-made run directory
