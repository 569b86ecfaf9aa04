"""Claims about `torchrun` runs, observed on 2 real gloo processes (tiny pretraining on Fashion-MNIST, CPU):
a signal that reaches one rank stops every rank after the same step with a checkpoint of it, and the resumed run
ends bit for bit where an uninterrupted one does (docs/reliability.md); a DDP run resumes under FSDP and ends
where the uninterrupted DDP run does (docs/distributed.md); `beit eval` on 2 processes writes what one writes."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_pretrain import write_config
from test_seg_load import _main, seg_run  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.fmnist,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the torchrun workers in /proc")]

# amp none, no drop path, exact mask counts: the runs compared differ only in how they were stopped or wrapped.
EXACT = {"model": {"drop_path_rate": 0.0}, "data": {"mask_mode": "exact", "batch_size": 16}}  # 2 x 16 = 32


def _torchrun(*args) -> list[str]:
    with socket.socket() as s:  # a free port: other test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            "-m", "beit", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run2(*args) -> subprocess.CompletedProcess:
    res = subprocess.run(_torchrun(*args), capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _train_rows(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]


def _ckpt(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / f"ckpt-{step:08d}.pt", weights_only=True)


def _workers(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun agent's worker processes (their RANK environment variable)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == agent_pid:
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
                ranks[rank] = int(stat.parent.name)
        except (OSError, StopIteration, ValueError, IndexError):
            continue  # a process that ended meanwhile, or not a worker
    return ranks


# One uninterrupted 2-process DDP run is the reference of both tests: 8 steps, a logged row every 2 (where the
# ranks compare their stop flags), checkpoints at 4 and 8.
TRAIN = {"epochs": 1, "max_steps": 8, "log_every": 2, "save_every_steps": 4, "amp": "none"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _run2("pretrain", str(write_config(root, **EXACT, train=TRAIN, dist={"strategy": "ddp"})))
    run_dir = root / "runs" / "cfg"
    rows = _train_rows(run_dir)
    assert [s for s, _ in rows] == [2, 4, 6, 8] and rows[-1][1] < rows[0][1]
    return run_dir


def test_a_signal_to_one_rank_stops_all_ranks_after_the_same_step_and_resumes_bitwise(tmp_path, reference):
    """SIGTERM to rank 1 alone (rank 0 is never signalled): both ranks stop after the same step, the next
    multiple of `train.log_every` where the ranks compare their flags; a checkpoint of that step is written;
    each worker exits 75; `--resume` on 2 processes ends with the weights and loss rows of an uninterrupted run."""
    cfg = write_config(tmp_path, **EXACT, train=TRAIN, dist={"strategy": "ddp"})
    run_dir = tmp_path / "runs" / "cfg"
    proc = subprocess.Popen(_torchrun("pretrain", str(cfg)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        metrics, deadline = run_dir / "metrics.jsonl", time.time() + 180
        while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.02)
        workers = _workers(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGTERM)  # after the step-2 row, before the end (step 8)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # every rank reports its own stop, at one step (rank 0 names no signal: it only learnt that a peer got one)
    stops = re.findall(r"stopped by (SIGTERM|signal) after step (\d+); checkpoint (\S+) written", err)
    assert sorted(s[0] for s in stops) == ["SIGTERM", "signal"], err[-3000:]
    steps = {int(s[1]) for s in stops}
    assert len(steps) == 1, stops
    step = steps.pop()
    assert step % 2 == 0 and 2 <= step < 8, step
    assert {s[2] for s in stops} == {str(run_dir / f"ckpt-{step:08d}.pt")}
    assert max(run_dir.glob("ckpt-*.pt")).name == f"ckpt-{step:08d}.pt"
    assert _ckpt(run_dir, step)["step"] == step
    # each worker exited 75 ("resume me"); torchrun reports their codes and fails itself
    codes = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", err)
    assert sorted(codes) == [("0", "75"), ("1", "75")], err[-3000:]
    assert proc.returncode != 0

    _run2("pretrain", str(cfg), "--resume")
    want, got = _ckpt(reference, 8)["model"], _ckpt(run_dir, 8)["model"]
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert _train_rows(run_dir) == _train_rows(reference)


def test_a_ddp_run_resumes_under_fsdp(tmp_path, reference):
    """The 2-process DDP run as if stopped after step 4, resumed as 2-process FSDP (the same global batch): it
    finishes, its rows after step 4 and its final weights and optimizer moments are the uninterrupted DDP run's
    (rel 1e-4 as docs/distributed.md's FSDP tests: FSDP reduces in another order), and it really ran FSDP."""
    moved = tmp_path / "runs" / "cfg"
    shutil.copytree(reference, moved)
    (moved / "ckpt-00000008.pt").unlink()  # as if stopped after step 4
    (moved / "summary.json").unlink(missing_ok=True)
    assert _ckpt(moved, 4)["config"]["dist"]["strategy"] == "ddp"
    fsdp = write_config(tmp_path, **EXACT, train=TRAIN, dist={"strategy": "fsdp"})
    _run2("pretrain", str(fsdp), "--resume")
    last, want = _ckpt(moved, 8), _ckpt(reference, 8)
    assert last["config"]["dist"]["strategy"] == "fsdp"
    ref, got = _train_rows(reference), _train_rows(moved)
    assert [s for s, _ in got] == [2, 4, 6, 8]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in ref], rel=1e-4, abs=1e-4)
    assert want["model"].keys() == last["model"].keys()
    for k in want["model"]:
        torch.testing.assert_close(last["model"][k], want["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    # the AdamW moments carried across: FSDP's gathered state equals DDP's, position for position
    assert last["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for i, s in want["optimizer"]["state"].items():
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(last["optimizer"]["state"][i][m], s[m], rtol=1e-3, atol=1e-8)


def test_a_multi_scale_flip_segmentation_eval_on_2_processes_writes_what_one_process_writes(tmp_path, seg_run):  # noqa: F811
    """`torchrun -m beit eval SEG_RUN` with multi-scale + flip: each rank scores half of the images, rank 0 alone
    writes, and results.json is the one-process one (the per-class pixel counts are summed exactly)."""
    run, _ = seg_run
    args = ["eval", str(run), "seg.eval_scales=[0.75,1.0,1.25]", "seg.eval_flip=true", "seg.eval_batch_size=1",
            f"train.out_dir={tmp_path}"]
    assert _main([*args, "train.run_name=one"]) == 0
    _run2(*args, "train.run_name=two")
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert two == one and one["num_images"] == 2 and one["eval_flip"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]  # no second writer


def test_knn_on_2_processes_writes_what_one_process_writes(tmp_path, reference):
    """`torchrun -m beit knn RUN`: the ranks split both feature passes (uneven shares of 101 and 37 images),
    rank 0 alone writes, and top-1 / top-5 are the one-process ones."""
    args = ["knn", str(reference), "data.train_subset=101", "data.eval_subset=37", f"train.out_dir={tmp_path}"]
    assert _main([*args, "train.run_name=one"]) == 0
    _run2(*args, "train.run_name=two")
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]
