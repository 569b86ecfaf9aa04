"""Claims of the README and docs/reliability.md observed on small real runs (a 2-block, 32-wide model on a
generated 3-class colour ImageFolder, a few steps each): fine-tuning and linear-probe runs resumed half-way
equal the uninterrupted runs bit for bit (mixing, EMA and data order included), `train.keep_last` prunes,
the global-batch warning is loud, TensorBoard logs are written, and `train.knn_every_epochs` runs k-NN."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit.config import load_config
from beit.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
MODEL = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.num_classes=3", "model.in_chans=3",
         "data.in_chans=3",
         "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ (12 per class) and test/ (3 per class) of noisy solid-colour 32x32 images."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for name, c in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(c)[None, None] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def _weights(run_dir: Path, step: int, key: str = "model") -> dict:
    return torch.load(run_dir / f"ckpt-{step:08d}.pt", weights_only=True)[key]


def _assert_same_run(a: Path, b: Path, step: int, keys=("model",)):
    """Two runs end with bitwise-equal weights (for each of `keys`) and log the same training rows."""
    for key in keys:
        wa, wb = _weights(a, step, key), _weights(b, step, key)
        assert wa.keys() == wb.keys() and len(wa) > 0, key
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (key, k)
    timing = ("time", "img_per_s", "data_wait_s", "data_wait_frac")  # wall-clock measurements differ
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(a / "metrics.jsonl", "train")) == strip(read_metrics(b / "metrics.jsonl", "train"))


# ------------------------------------------------------------------------------------------------ fine-tuning
def _finetune_cfg(folder: Path, out: Path, name: str, *extra: str):
    return load_config("configs/finetune/fmnist_scratch.yaml", MODEL + [
        "model.name=beit_fmnist_patch4_32", "data.dataset=image_folder", f"data.root={folder}",
        "data.batch_size=6", "data.num_workers=0", "data.mixup=0.8", "data.cutmix=1.0", "data.reprob=0.25",
        "train.epochs=2", "train.amp=none", "train.progress=false", "train.ema_decay=0.9", "train.save_every_steps=2",
        "train.keep_last=2", "train.log_every=1", "optim.warmup_epochs=0", "optim.layer_decay=0.75",
        f"train.out_dir={out}", f"train.run_name={name}", *extra])


@pytest.fixture(scope="module")
def full_finetune(folder, tmp_path_factory) -> Path:
    """The uninterrupted fine-tune (12 steps, main-process loading) the resumed runs are compared with."""
    from beit.tasks import run

    return run("finetune", _finetune_cfg(folder, tmp_path_factory.mktemp("finetune"), "full"))


def test_finetune_resumes_bit_for_bit_with_mixing_and_ema_and_keeps_the_last_checkpoints(folder, full_finetune,
                                                                                         tmp_path):
    """12 steps (2 epochs of 6) with mixup/cutmix, random erasing, drop path and EMA: stopped after step 6 (the
    end of the first epoch) and resumed, the run ends with the uninterrupted run's weights and EMA weights, bit
    for bit, and its losses."""
    from beit.tasks import run

    full = full_finetune
    # the global batch of 6 differs from the recipe's 128: the run's log says so, loudly, with the fix
    log = (full / "log.txt").read_text()
    assert log.count("GLOBAL BATCH 6 ") == 1 and "!" * 78 + "\nGLOBAL BATCH 6 " in log
    assert "set optim.recipe_batch_size=6" in log
    # keep_last=2: only the two newest of the checkpoints saved every 2 steps remain
    assert [p.name for p in sorted(full.glob("ckpt-*.pt"))] == ["ckpt-00000010.pt", "ckpt-00000012.pt"]

    part = run("finetune", _finetune_cfg(folder, tmp_path, "part", "train.max_steps=6"))
    assert [p.name for p in sorted(part.glob("ckpt-*.pt"))] == ["ckpt-00000004.pt", "ckpt-00000006.pt"]
    np.random.seed(123)  # the caller's global numpy state differs from the first run's: mixing must not care
    torch.manual_seed(123)
    run("finetune", _finetune_cfg(folder, tmp_path, "part"), resume=True)
    _assert_same_run(full, part, 12, keys=("model", "ema"))
    # EMA: updated (not the model, not its start) and evaluated
    ema, model = _weights(full, 12, "ema"), _weights(full, 12)
    assert not torch.equal(ema["head.weight"], model["head.weight"])
    rows = read_metrics(full / "metrics.jsonl", "eval")
    assert [r["step"] for r in rows] == [6, 12] and all("ema_top1" in r for r in rows)


def test_finetune_resumed_inside_an_epoch_with_other_workers_is_bit_for_bit(folder, full_finetune, tmp_path):
    """The same recipe stopped by train.max_steps=5, inside the first epoch, with one loader worker, and resumed
    loading in the main process: bit for bit the uninterrupted run (main-process loading throughout).

    Two things make this hold. The crops, flips and erasing of sample i in epoch e are drawn under global RNGs
    seeded by (seed, e, i), not from a stream whose position depends on the samples a process drew before.
    And the evaluation the stopped run makes at step 5 (the uninterrupted run makes none there) leaves the
    RNG states that drive drop path and mixing as they were, so its checkpoint holds the uninterrupted run's."""
    from beit.tasks import run

    part = run("finetune", _finetune_cfg(folder, tmp_path, "part", "train.max_steps=5", "data.num_workers=1"))
    assert [r["step"] for r in read_metrics(part / "metrics.jsonl", "eval")] == [5]  # the evaluation at the stop
    run("finetune", _finetune_cfg(folder, tmp_path, "part"), resume=True)
    _assert_same_run(full_finetune, part, 12, keys=("model", "ema"))


def test_matching_recipe_batch_gives_no_warning(folder, tmp_path):
    from beit.tasks import run

    run_dir = run("finetune", _finetune_cfg(folder, tmp_path, "ok", "optim.recipe_batch_size=6", "train.max_steps=1",
                                         "train.ema_decay=null"))
    log = (run_dir / "log.txt").read_text()
    assert "1 steps to go" in log and "GLOBAL BATCH" not in log


def test_tensorboard_logs_hold_the_logged_scalars(folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from beit.tasks import run

    run_dir = run("finetune", _finetune_cfg(folder, tmp_path, "tb", "train.max_steps=3", "train.ema_decay=null"))
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    want = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]
    got = events.Scalars("train/loss")
    assert [e.step for e in got] == [1, 2, 3]
    assert [e.value for e in got] == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------------------------ linear probe
@pytest.mark.parametrize("cached", [True, False], ids=["cached-features", "augmented"])
def test_linprobe_resumes_bit_for_bit(folder, tmp_path, cached):
    """A probe stopped after step 3 (inside the first epoch) and resumed equals the uninterrupted probe: the
    shipped protocol (features cached once: the same shuffled batches, the same head updates), and the
    official one with crop and flip per step (`train.probe_cache_features=false`), stopped while loading in
    one worker and resumed loading in the main process, which sees the same crops (keyed by seed, epoch and
    sample)."""
    from beit.tasks import run

    def cfg(name, *extra):
        return load_config("configs/linprobe/fmnist.yaml", MODEL + [
            "model.name=beit_fmnist_patch4_32_512_vocab", "model.pretrained=null", "data.dataset=image_folder",
            f"data.root={folder}", "data.batch_size=6", "optim.recipe_batch_size=6", "train.epochs=2",
            "train.amp=none", "train.progress=false", "train.save_every_steps=3",
            "train.log_every=1", "train.eval_every_epochs=1", f"train.out_dir={tmp_path}", f"train.run_name={name}",
            f"train.probe_cache_features={str(cached).lower()}", "data.num_workers=0", *extra])

    full = run("linprobe", cfg("full"))
    part = run("linprobe", cfg("part", "train.max_steps=3", *([] if cached else ["data.num_workers=1"])))
    torch.manual_seed(7)
    run("linprobe", cfg("part"), resume=True)
    _assert_same_run(full, part, 12)


# ------------------------------------------------------------------------------------------------ pretraining
@pytest.mark.fmnist
def test_knn_every_epochs_evaluates_during_pretraining(tmp_path):
    from test_pretrain import write_config

    from beit.tasks import run

    run_dir = run("pretrain", load_config(write_config(
        tmp_path, data={"train_subset": 64, "eval_subset": 20}, train={"epochs": 2, "knn_every_epochs": 1})))
    rows = read_metrics(run_dir / "metrics.jsonl", "eval")
    assert [r["step"] for r in rows] == [2, 4]  # 64 images / batch 32 = 2 steps per epoch
    for r in rows:
        assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 100
