"""End-to-end pretraining: smoke run on Fashion-MNIST, exact resume after SIGKILL, DDP == single process."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from beit.config import load_config
from beit.train.metrics import read_metrics
from beit.train.loop import lr_at

# A small but real setup: the shipped tokenizer, the Fashion-MNIST preset shrunk to 2 blocks.
TINY = {
    "model": {"name": "beit_fmnist_patch4_32_512_vocab", "depth": 2, "embed_dim": 64, "num_heads": 2},
    "tokenizer": {"name": "fmnist_dvae", "image_size": 32},
    "data": {"dataset": "fashion_mnist", "img_size": 32, "in_chans": 1, "mean": [0.286], "std": [0.353],
             "batch_size": 32, "num_workers": 0, "crop_scale": [0.35, 1.0], "num_mask_patches": 26,
             "min_mask_patches": None, "train_subset": 512},
    "optim": {"lr": 2e-3, "warmup_steps": 5, "min_lr": 1e-5},
    "train": {"epochs": 1, "amp": "bf16", "device": "cpu", "log_every": 4, "save_every_steps": 1000,
              "progress": False},
}


def write_config(tmp_path: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for sec, vals in sections.items():
        cfg.setdefault(sec, {}).update(vals)
    cfg["train"]["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def beit_cmd(*args, nproc=1):
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", "29517", "-m", "beit", *args]
    return [sys.executable, "-m", "beit", *args]


def run(*args, nproc=1, env=None):
    res = subprocess.run(beit_cmd(*args, nproc=nproc), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_schedule_is_a_function_of_the_step():
    assert lr_at(0, 1.0, 0.1, 10, 100) == 0.0  # warmup starts at 0, as official
    assert lr_at(10, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert lr_at(99, 1.0, 0.1, 10, 100) == pytest.approx(0.1)  # exactly min_lr at the last step
    assert lr_at(55, 1.0, 0.1, 10, 100) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 89)))


@pytest.mark.fmnist
def test_smoke_pretraining_learns(tmp_path):
    """Loss falls and masked-token accuracy beats chance (1/512) within a couple of minutes on CPU."""
    from beit.tasks import run

    cfg = load_config(write_config(tmp_path, data={"train_subset": 2048}, train={"epochs": 2}))
    run_dir = run("pretrain", cfg)
    rows = read_metrics(run_dir / "metrics.jsonl", "train")
    assert len(rows) >= 10
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"] - 0.5, (first, last)
    assert last["mlm_acc"] > 5 / 512, last  # well above chance
    assert 0.3 < last["mask_frac"] < 0.45  # ~26 of 64 patches
    assert {"lr", "grad_norm", "img_per_s"} <= set(last)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["depth"] == 2  # the resolved config is written into the run directory
    ckpt = torch.load(sorted(run_dir.glob("ckpt-*.pt"))[-1], weights_only=True)
    assert ckpt["config"]["model"]["name"] == TINY["model"]["name"]


@pytest.mark.fmnist
def test_existing_run_is_never_overwritten(tmp_path):
    from beit.train.checkpoint import RunDirError
    from beit.tasks import run

    cfg = load_config(write_config(tmp_path, train={"max_steps": 1}))
    run_dir = run("pretrain", cfg)
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(RunDirError, match="already exists"):
        run("pretrain", cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == before


def _final_weights(run_dir: Path) -> dict:
    return torch.load(sorted(run_dir.glob("ckpt-*.pt"))[-1], weights_only=True)["model"]


@pytest.mark.fmnist
def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    steps = 16 * 2  # 16 steps per epoch, 2 epochs; killed mid-epoch 1
    over = {"train": {"epochs": 2, "save_every_steps": 5, "keep_last": 2}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref = write_config(tmp_path / "a", **over)
    run("pretrain", str(ref))

    cfg = write_config(tmp_path / "b", **over)
    proc = subprocess.Popen(beit_cmd("pretrain", str(cfg)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_dir = tmp_path / "b" / "runs" / "cfg"
    deadline = time.time() + 300
    while not (run_dir / "ckpt-00000010.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last_step = int(sorted(run_dir.glob("ckpt-*.pt"))[-1].stem.split("-")[1])
    assert 10 <= last_step < steps and last_step % 16 != 0  # it really died mid-run, mid-epoch

    run("pretrain", str(cfg), "--resume")
    a, b = _final_weights(tmp_path / "a" / "runs" / "cfg"), _final_weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps_logged = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]
    assert steps_logged == sorted(set(steps_logged))  # no duplicated rows after the resume


@pytest.mark.fmnist
def test_ddp_two_processes_match_one(tmp_path):
    """2-process gloo DDP at the same global batch gives the same loss curve as 1 process."""
    common = {"train": {"max_steps": 8, "log_every": 1, "amp": "none"},
              "model": {"drop_path_rate": 0.0}, "data": {"mask_mode": "exact"}}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = write_config(tmp_path / "one", **common, optim={"accum_steps": 1})
    run("pretrain", str(one))
    two = write_config(tmp_path / "two", **{**common, "data": {"mask_mode": "exact", "batch_size": 16}})
    run("pretrain", str(two), nproc=2, env={"OMP_NUM_THREADS": "1"})
    la = [r["loss"] for r in read_metrics(tmp_path / "one" / "runs" / "cfg" / "metrics.jsonl", "train")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "two" / "runs" / "cfg" / "metrics.jsonl", "train")]
    assert len(la) == len(lb) == 8
    assert la[-1] < la[0]
    for x, y in zip(la, lb):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-4)


@pytest.mark.fmnist
def test_nonfinite_loss_is_caught_at_the_next_log_step(tmp_path):
    """The finite check is read at log steps and before saves (the step never waits on the device): a NaN
    in the 6th step raises at the log step 8, or at a save after step 6, naming step 6 and the steps checked."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from beit.config import Config
    from beit.train.distributed import DistInfo
    from beit.train.loop import Task, fit

    class Tiny(nn.Linear):
        depth = 0

        def no_weight_decay(self):
            return set()

        def layer_id(self, name):
            return 1

    calls = []

    def step(model, batch):
        calls.append(1)
        loss = model(batch[0]).pow(2).mean()
        return {"loss": loss * float("nan") if len(calls) == 6 else loss}

    for save_every, stop in ((100, 8), (6, 6)):
        calls.clear()
        (tmp_path / str(stop)).mkdir()
        cfg = Config.model_validate({"data": {"batch_size": 8, "num_workers": 0},
                                     "train": {"epochs": 1, "log_every": 4, "save_every_steps": save_every,
                                               "device": "cpu", "amp": "none", "progress": False}})
        task = Task(model=Tiny(2, 1), step=step, dataset=TensorDataset(torch.randn(64, 2)))
        with pytest.raises(FloatingPointError, match=rf"loss is nan at step 6; .*covered steps 5-{stop}\)"):
            fit(cfg, task, tmp_path / str(stop), DistInfo())
        assert len(calls) == stop  # ran on to the log step / the save
        assert not list((tmp_path / str(stop)).glob("ckpt-*.pt"))  # NaN-touched weights are never saved
