"""docs/reliability.md, row by row: each test breaks when its row's behaviour does.

Signal, resume, corrupt-file and write-failure cases run `python -m beit pretrain` as real processes on a tiny
Fashion-MNIST run (128 images, batch 16: 8 steps per epoch, 2 epochs) and corrupt real files.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from beit.cli import main
from beit.config import ConfigError, check_resume_config, load_config
from beit.data import datasets as ds_mod
from beit.models import create_model
from beit.train import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "pretrain" / "fmnist_quick.yaml")
TINY = ["data.train_subset=128", "data.batch_size=16", "data.num_workers=0", "train.epochs=2", "train.log_every=3",
        "train.save_every_steps=4", "train.progress=false", "optim.warmup_steps=2"]
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(ds_mod.FASHION_MNIST_DEBIAN, "train-images-idx3-ubyte.gz")),
                                  reason="apt-get install dataset-fashion-mnist")


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "beit", "pretrain", CONFIG, *TINY, f"train.out_dir={out}", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(out: Path, *extra: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, *extra), env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)


def _weights(run_dir: Path) -> dict:
    return torch.load(ckpt_io.list_checkpoints(run_dir)[-1], weights_only=True)["model"]


def _losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["mlm_acc"], r.get("grad_norm")) for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: the ground truth for every resume test."""
    out = tmp_path_factory.mktemp("ref")
    res = _run(out)
    assert res.returncode == 0, res.stderr
    return out / "fmnist_quick"


# ------------------------------------------------------------------------------------------------ 1. validation
@pytest.mark.parametrize("override,says", [
    ("data.batch_size=0", "data.batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("data.label_fraction=1.5", "data.label_fraction"),
    ("train.epochs=-1", "train.epochs"),
    ("optim.min_lr=1", "optim.min_lr"),
    ("data.mean=[0.1,0.2]", "data.mean"),
    pytest.param("train.amp=fp16", "fp16 needs a CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid with CUDA")),
])
def test_bad_value_is_one_line_before_anything_is_created(tmp_path, capsys, override, says):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", CONFIG, override, f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # no run directory: the corrected command does not hit "already exists"


@needs_fmnist
def test_dataset_smaller_than_a_batch_fails_before_the_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", CONFIG, "data.train_subset=10", "data.batch_size=16", f"train.out_dir={tmp_path}"])
    assert "fewer than one global batch" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@needs_fmnist
@pytest.mark.parametrize("override,says", [("model.vocab_size=256", "model vocab_size 256 != tokenizer vocab_size 512"),
                                           ("data.img_size=28", "data.img_size 28 != model img_size 32"),
                                           ("tokenizer.image_size=64", "grid (8, 8) != tokenizer grid 16x16")])
def test_model_data_tokenizer_mismatch_fails_before_the_run_directory(tmp_path, capsys, override, says):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", CONFIG, override, f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("world, code", [("2", 75), ("1", -signal.SIGTERM)])
def test_a_torchrun_worker_sigtermed_while_exiting_after_a_stop_still_exits_75(world, code):
    """Under torchrun the first worker to exit makes the agent SIGTERM the rest, which may be tearing down after
    writing the same checkpoint: they must still exit 75 ("resume me"), not -15. The SIGTERM is sent from an
    atexit hook, i.e. during the interpreter's teardown after the stop. A plain process (WORLD_SIZE 1) gets
    its handlers back as they were, so there the SIGTERM still kills it."""
    script = (
        "import atexit, os, signal, sys\n"
        "from beit.train.loop import Preempted, _StopSignals\n"
        "try:\n"
        "    with _StopSignals():\n"
        "        raise Preempted('SIGTERM', 4, None)\n"
        "except Preempted:\n"
        "    pass\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
        "sys.exit(75)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**_env(), "WORLD_SIZE": world})
    assert res.returncode == code, res.stderr


# ------------------------------------------------------------------------------------------------ 2. preemption
@needs_fmnist
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_resume_is_bitwise(tmp_path, reference, sig):
    proc = subprocess.Popen(_cmd(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "fmnist_quick" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)  # after the first logged window (step 3), before the end (step 16)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Resume with: beit pretrain" in err and "--resume" in err and signal.Signals(sig).name in err
    stopped = torch.load(ckpt_io.list_checkpoints(tmp_path / "fmnist_quick")[-1], weights_only=True)
    assert 3 <= stopped["step"] < 16
    res = _run(tmp_path, "--resume")
    assert res.returncode == 0, res.stderr
    # the summary's training time counts the stopped process (up to its checkpoint) and the resumed one
    summary = json.loads((tmp_path / "fmnist_quick" / "summary.json").read_text())
    assert stopped["wall_time_s"] > 0 and summary["wall_time_before_resume_s"] == stopped["wall_time_s"]
    assert summary["wall_time_s"] > stopped["wall_time_s"]
    got, want = _weights(tmp_path / "fmnist_quick"), _weights(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # 5. the first window after the resume averages the same steps as the uninterrupted run's
    assert _losses(tmp_path / "fmnist_quick") == _losses(reference)


# ------------------------------------------------------------------------------------------------ 3. resume safety
def test_resume_with_a_different_config_names_the_keys(tmp_path):
    stored = load_config(CONFIG, TINY).to_dict()
    with pytest.raises(ConfigError, match=r"data\.batch_size \(16 -> 32\), optim\.lr \(0\.0015 -> 0\.001\)"):
        check_resume_config(stored, load_config(CONFIG, [*TINY, "optim.lr=1e-3", "data.batch_size=32"]), "x")
    # cadence and length may change: extend a run, log more often
    check_resume_config(stored, load_config(CONFIG, [*TINY, "train.epochs=4", "train.log_every=1"]), "x")


@needs_fmnist
def test_resume_cli_rejects_a_changed_config(tmp_path, reference, capsys):
    shutil.copytree(reference, tmp_path / "fmnist_quick")
    with pytest.raises(SystemExit):
        main(["pretrain", CONFIG, *TINY, f"train.out_dir={tmp_path}", "optim.lr=1e-3", "--resume"])
    assert "optim.lr" in capsys.readouterr().err


@needs_fmnist
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, reference):
    run_dir = tmp_path / "fmnist_quick"
    shutil.copytree(reference, run_dir)
    older, newest = ckpt_io.list_checkpoints(run_dir)[-2:]  # steps 12 and 16 (keep_last 2)
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated, as by a crash on a non-atomic copy
    (run_dir / "summary.json").unlink()
    res = _run(tmp_path, "--resume")
    assert res.returncode == 0, res.stderr
    assert str(newest) in res.stderr and str(older) in res.stderr and "unreadable" in res.stderr
    got, want = _weights(run_dir), _weights(reference)  # retrained from step 12: the same weights
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_corrupt_pretrained_gets_our_message(tmp_path, capsys):
    path = tmp_path / "broken.pt"
    torch.save(create_model("beit_fmnist_patch4_32_512_vocab").state_dict(), path)
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(SystemExit):
        main(["pretrain", CONFIG, f"model.pretrained={path}", f"train.out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert str(path) in err and "truncated or corrupt" in err and "weights_only" not in err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ 4. write failures
def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # metrics and logs fit; a checkpoint does not


@needs_fmnist
def test_failed_checkpoint_write_keeps_the_previous_ones(tmp_path, reference):
    run_dir = tmp_path / "fmnist_quick"
    shutil.copytree(reference, run_dir)
    before = {p.name: p.read_bytes() for p in ckpt_io.list_checkpoints(run_dir)}
    assert min(len(b) for b in before.values()) > 200_000
    res = _run(tmp_path, "train.epochs=3", "--resume", preexec=_small_file_limit)  # extends the run by 8 steps
    assert res.returncode == 2 and "could not write" in res.stderr and "Traceback" not in res.stderr
    assert {p.name: p.read_bytes() for p in ckpt_io.list_checkpoints(run_dir)} == before
    assert not list(run_dir.glob(".*.tmp"))


def test_atomic_save_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.isdir(f"/proc/self/fd/{fd}")), real(fd)))
    ckpt_io.atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pt")
    assert synced == [False, True]  # the file, then its directory


# ------------------------------------------------------------------------------------------------ 5. non-finite
@needs_fmnist
def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", CONFIG, *TINY, f"train.out_dir={tmp_path}", "optim.lr=1e30", "optim.clip_grad=null",
              "train.save_every_steps=1", "optim.warmup_steps=0"])
    err = capsys.readouterr().err
    assert "loss is nan at step" in err and "last good checkpoint is" in err and "ckpt-" in err


# ------------------------------------------------------------------------------------------------ 6. masks
def test_forward_mim_rejects_a_non_bool_mask():
    model = create_model("beit_fmnist_patch4_32_512_vocab")
    x, mask = torch.randn(2, 1, 32, 32), torch.zeros(2, 64, dtype=torch.long)
    mask[:, :10] = 1
    with pytest.raises(ValueError, match="must be a bool tensor"):
        model.forward_mim(x, mask)
    assert model.forward_mim(x, mask.bool()).shape == (20, 512)


def test_stored_global_batch_is_read_from_the_checkpoint_a_resume_uses(tmp_path):
    """A corrupt newest checkpoint is passed over (as `load_latest_intact` does), so the resume's batch check
    compares against the checkpoint the run will actually continue from."""
    torch.save({"global_batch": 64}, tmp_path / "ckpt-00000010.pt")
    (tmp_path / "ckpt-00000020.pt").write_bytes(b"truncated")
    assert ckpt_io.stored_global_batch(tmp_path) == 64
    (tmp_path / "ckpt-00000010.pt").unlink()
    assert ckpt_io.stored_global_batch(tmp_path) is None
