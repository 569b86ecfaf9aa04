"""Throughput as torchtitan logs it: img/s = images since the last log row / wall time since then, and the
time spent waiting for data beside it. A fake clock makes every duration known in advance."""

import json
import math
import time
import types

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import beit.train.loop as loop
from beit.config import Config
from beit.train.distributed import DistInfo

BATCH, LOG_EVERY, STEPS = 4, 3, 9
ITEM_S = 0.25  # fake seconds per decoded item (data wait)
STEP_S = (1.0, 2.0, 6.0)  # fake seconds of compute, step by step (uneven: a mean of per-step rates differs)


class Clock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


class Tiny(nn.Linear):
    depth = 0

    def no_weight_decay(self):
        return set()

    def layer_id(self, name):
        return 1


class SlowItems(Dataset):
    def __init__(self, clock):
        self.clock = clock

    def __len__(self):
        return 64

    def __getitem__(self, i):
        self.clock.now += ITEM_S
        return (torch.full((2,), float(i)),)


def test_img_per_s_is_images_over_wall_time_between_log_rows_and_data_wait_is_logged(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, time=time.time))

    steps = []

    def step(model, batch):
        clock.now += STEP_S[len(steps) % 3]
        steps.append(1)
        return {"loss": model(batch[0]).pow(2).mean()}

    cfg = Config.model_validate({"data": {"batch_size": BATCH, "num_workers": 0},
                                 "train": {"steps": STEPS, "log_every": LOG_EVERY, "save_every_steps": 100,
                                           "device": "cpu", "amp": "none", "progress": False}})
    task = loop.Task(model=Tiny(2, 1), step=step, dataset=SlowItems(clock))
    # between log rows the loop also evaluates and saves; that time must not count (a 50 s evaluation)
    task.evaluate = lambda model: (setattr(clock, "now", clock.now + 50.0), {"score": 1.0})[1]
    task.eval_every_epochs = LOG_EVERY * BATCH / 64  # an evaluation at every log step
    loop.fit(cfg, task, tmp_path, DistInfo())

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6, 9]
    assert sum(r["split"] == "eval" for r in rows) == 3
    wait = LOG_EVERY * BATCH * ITEM_S  # 3 s of decoding per interval
    elapsed = wait + sum(STEP_S)  # + 9 s of steps = 12 s for 12 images
    per_step_mean = sum(BATCH / (BATCH * ITEM_S + s) for s in STEP_S) / 3  # the old definition: 1.17
    for r in train:
        assert r["img_per_s"] == pytest.approx(LOG_EVERY * BATCH / elapsed)  # 1.0
        assert r["img_per_s"] != pytest.approx(per_step_mean)
        assert r["data_wait_s"] == pytest.approx(wait)
        assert r["data_wait_frac"] == pytest.approx(wait / elapsed)
        assert {"loss", "grad_norm", "lr", "epoch"} <= set(r)


def test_the_device_is_synchronised_only_at_log_steps(monkeypatch):
    """On CUDA the interval ends after the queued work has run: one synchronize per log row, none per step."""
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    t = loop.Throughput()
    t.start_step()
    t.images += 8
    out = t.flush(torch.device("cuda", 0))
    assert syncs == [torch.device("cuda", 0)] and out["img_per_s"] > 0
    t.start_step()
    t.flush(torch.device("cpu"))
    assert len(syncs) == 1


@pytest.mark.parametrize("epochs", [1.0, 1.067, 2.5])
def test_a_cadence_as_long_as_the_run_evaluates_once_at_the_end(tmp_path, epochs):
    """train.eval_every_epochs = train.epochs means one evaluation, after the last step. With a fractional
    length, rounding the cadence to steps (round(1.067 x 16) = 17) fell one step before the end
    (ceil(1.067 x 16) = 18), and the run evaluated twice."""
    cfg = Config.model_validate({"data": {"batch_size": 4, "num_workers": 0},
                                 "train": {"epochs": epochs, "eval_every_epochs": epochs, "save_every_steps": 100,
                                           "device": "cpu", "amp": "none", "progress": False}})
    task = loop.Task(model=Tiny(2, 1), step=lambda model, batch: {"loss": model(batch[0]).pow(2).mean()},
                     dataset=torch.utils.data.TensorDataset(torch.randn(64, 2)))
    evals = []
    task.evaluate = lambda model: (evals.append(1), {"score": 1.0})[1]
    loop.fit(cfg, task, tmp_path, DistInfo())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(evals) == 1 and [r["step"] for r in rows if r["split"] == "eval"] == [math.ceil(epochs * 16)]
