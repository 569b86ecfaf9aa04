"""Data integrity and run safety (docs/reliability.md): one class index per run, run directories one process
owns, one-line errors for bad input, messages that name the real cause."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit.cli import main

REPO = Path(__file__).resolve().parent.parent
SCRATCH = str(REPO / "configs" / "finetune" / "fmnist_scratch.yaml")
# A 1-block, 32-wide classifier on 32 px grey images; no augmentation that could blur the classes.
TINY_FT = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "data.batch_size=16", "data.num_workers=0",
           "data.color_jitter=0", "train.progress=false", "train.log_every=4", "train.epochs=3",
           "optim.warmup_epochs=0", "optim.lr=3e-3", "optim.layer_decay=null", "train.label_smoothing=0",
           "train.export=[]"]
LEVELS = {"a_dark": 20, "b_mid": 128, "c_light": 235}  # trivially separable: the mean grey level is the class

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_folder(root: Path, split: str, classes: list[str], n: int, seed: int = 0):
    rng = np.random.default_rng([seed, len(split)])
    for name in classes:
        d = root / split / name
        d.mkdir(parents=True)
        for i in range(n):
            level = LEVELS.get(name, 80)
            px = np.clip(level + rng.integers(-10, 11, (32, 32)), 0, 255).astype(np.uint8)
            Image.fromarray(px, "L").save(d / f"{i}.png")


def _ft_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", SCRATCH, *TINY_FT, "data.dataset=image_folder", f"data.root={root}", "model.num_classes=3",
            f"train.out_dir={out}", "train.run_name=three", *extra]


# ------------------------------------------------------------------------------------------------ class index
def test_test_split_lacking_a_class_keeps_the_training_numbering(tmp_path):
    """test/ lacks the middle class: its third class keeps label 2, so a model that learned the classes scores
    ~100%, not the 50% that separate numbering (c_light -> 1) would give."""
    _write_folder(tmp_path / "data", "train", list(LEVELS), 32)
    _write_folder(tmp_path / "data", "test", ["a_dark", "c_light"], 20, seed=1)
    main(_ft_args(tmp_path / "data", tmp_path / "runs"))
    run = tmp_path / "runs" / "three"
    results = json.loads((run / "results.json").read_text())
    assert results["top1"] >= 90.0, results
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["class_names"] == ["a_dark", "b_mid", "c_light"]  # the run's index travels with its weights


def test_test_split_with_an_unknown_class_is_one_line_before_training(tmp_path, capsys):
    _write_folder(tmp_path / "data", "train", ["a_dark", "c_light"], 8)
    _write_folder(tmp_path / "data", "test", ["a_dark", "b_mid", "c_light"], 2)
    with pytest.raises(SystemExit) as e:
        main(_ft_args(tmp_path / "data", tmp_path / "runs"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "['b_mid']" in err and "data.on_unknown_class=skip" in err and str(tmp_path / "data" / "test") in err
    assert not (tmp_path / "runs").exists()  # nothing was trained or created


def test_unknown_class_images_can_be_skipped_and_counted_by_name(tmp_path, caplog):
    from beit.config import load_config
    from beit.data import build_dataset

    _write_folder(tmp_path / "data", "train", ["a_dark", "c_light"], 2)
    _write_folder(tmp_path / "data", "test", ["a_dark", "b_mid", "c_light"], 3)
    cfg = load_config(SCRATCH, ["data.dataset=image_folder", f"data.root={tmp_path / 'data'}",
                                "data.on_unknown_class=skip"])
    ds = build_dataset(cfg.data, "test")
    assert ds.skipped_classes == {"b_mid": 3}
    assert ds.classes == ["a_dark", "c_light"] and sorted(ds.targets.tolist()) == [0, 0, 0, 1, 1, 1]
    assert "b_mid (3 images)" in caplog.text


# ------------------------------------------------------------------------------------------------ beit eval
def _classifier_ckpt(path: Path, names: list[str], dataset: str = "image_folder", root: str | None = None) -> Path:
    """A tiny (untrained) 32 px grey classifier saved as our training checkpoints are: weights, config, classes."""
    from beit.config import load_config
    from beit.models import create_model

    cfg = load_config(SCRATCH, [*TINY_FT, f"model.num_classes={len(names)}", f"data.dataset={dataset}",
                                f"data.root={root}" if root else "data.root=null", "data.eval_subset=20"])
    model = create_model(cfg.model.name, **cfg.model.overrides())
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0, "class_names": names}, path)
    return path


def test_eval_reads_a_folder_with_the_checkpoints_class_index(tmp_path):
    ckpt = _classifier_ckpt(tmp_path / "c.pt", ["a_dark", "b_mid", "c_light"])
    _write_folder(tmp_path / "data", "test", ["a_dark", "c_light"], 3)  # no train/: the checkpoint's index
    main(["eval", str(ckpt), f"data.root={tmp_path / 'data'}", f"train.out_dir={tmp_path / 'runs'}"])
    res = json.loads(next((tmp_path / "runs").glob("*/results.json")).read_text())
    assert res["class_names"] == ["a_dark", "b_mid", "c_light"] and res["num_samples"] == 6
    cm = res["confusion_matrix"]  # true rows: c_light's 3 images sit in row 2, the middle row is empty
    assert [sum(r) for r in cm] == [3, 0, 3]


def test_eval_on_other_class_names_is_one_line_showing_both(tmp_path, capsys):
    ckpt = _classifier_ckpt(tmp_path / "c.pt", ["a_dark", "b_mid", "c_light"])
    _write_folder(tmp_path / "data", "test", ["a_dark", "zebra"], 2)
    args = ["eval", str(ckpt), f"data.root={tmp_path / 'data'}", f"train.out_dir={tmp_path / 'runs'}"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "['zebra']" in err and "['a_dark', 'b_mid', 'c_light']" in err and "--allow-other-classes" in err
    assert not (tmp_path / "runs").exists()
    main([*args, "--allow-other-classes"])  # meant to differ: scored by the data's own numbering
    assert json.loads(next((tmp_path / "runs").glob("*/results.json")).read_text())["num_samples"] == 4


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist")
def test_eval_of_a_digits_checkpoint_on_fashion_mnist_is_an_error(tmp_path, capsys):
    ckpt = _classifier_ckpt(tmp_path / "c.pt", [str(i) for i in range(10)], dataset="fashion_mnist")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(ckpt), f"train.out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "['T-shirt/top', 'Trouser'" in err and "['0', '1', '2'" in err


# ------------------------------------------------------------------------------------------------ run lock
PRETRAIN = str(REPO / "configs" / "pretrain" / "fmnist_quick.yaml")
TINY_PT = ["data.train_subset=128", "data.batch_size=16", "data.num_workers=0", "train.epochs=2", "train.log_every=3",
           "train.save_every_steps=4", "train.progress=false", "optim.warmup_steps=2", "train.export=[]"]
needs_fmnist = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                                  reason="apt-get install dataset-fashion-mnist")


def _pretrain_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "beit", "pretrain", PRETRAIN, *TINY_PT, f"train.out_dir={out}", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.time() + timeout
    while not (path.exists() and path.stat().st_size) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]


@needs_fmnist
def test_resume_and_overwrite_of_a_live_run_are_refused(tmp_path):
    live = subprocess.Popen(_pretrain_cmd(tmp_path, "train.epochs=1"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "fmnist_quick"
    _wait_for(run / "ckpt-00000004.pt", live)  # a run --resume could continue, were it not live
    os.kill(live.pid, signal.SIGSTOP)  # alive and holding its lock however slow the machine is
    try:
        others = [subprocess.Popen(_pretrain_cmd(tmp_path, "train.epochs=1", flag), env=_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for flag in ("--resume", "--overwrite")]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in others]
        assert live.poll() is None
    finally:
        os.kill(live.pid, signal.SIGCONT)
    for rc, err in results:
        assert rc == 2 and f"is in use by process {live.pid}" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    _, err = live.communicate(timeout=120)
    assert live.returncode == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 8  # one writer, whole run
    assert [p.name for p in sorted(run.glob("ckpt-*.pt"))] == ["ckpt-00000004.pt", "ckpt-00000008.pt"]
    assert not (tmp_path / ".fmnist_quick.lock").exists()  # released (and removed) at the end


@needs_fmnist
def test_a_stale_lock_from_a_killed_run_does_not_block_resume(tmp_path):
    proc = subprocess.Popen(_pretrain_cmd(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run = tmp_path / "fmnist_quick"
    _wait_for(run / "ckpt-00000004.pt", proc)
    proc.kill()  # SIGKILL: no handler runs, the lock file stays behind with the dead pid
    proc.communicate(timeout=60)
    assert (tmp_path / ".fmnist_quick.lock").read_text().strip() == str(proc.pid)
    res = subprocess.run(_pretrain_cmd(tmp_path, "--resume", "train.max_steps=8"), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr and (run / "ckpt-00000008.pt").is_file()


@needs_fmnist
def test_a_second_start_while_another_process_holds_the_run_is_refused(tmp_path):
    from beit.train import checkpoint as ckpt_io

    ckpt_io.acquire_run_lock(tmp_path / "fmnist_quick")  # this process now owns the (not yet created) run
    try:
        res = subprocess.run(_pretrain_cmd(tmp_path, "train.epochs=1"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    finally:
        ckpt_io.release_run_locks(tmp_path / "fmnist_quick")
    assert res.returncode == 2 and f"in use by process {os.getpid()}" in res.stderr, res.stderr
    assert not (tmp_path / "fmnist_quick").exists() and not (tmp_path / ".fmnist_quick.lock").exists()


# ------------------------------------------------------------------------------------------------ one line, exit 2
@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_failing_before_its_first_checkpoint_leaves_no_directory(tmp_path, capsys, workers):
    """A bad file under data.on_bad_file=fail stops the run in its first epoch: one line naming the file (also
    when a loader worker raised it), exit code 2, and no run directory in the way of the corrected rerun."""
    _write_folder(tmp_path / "data", "train", list(LEVELS), 6)
    _write_folder(tmp_path / "data", "test", list(LEVELS), 2, seed=1)
    bad = tmp_path / "data" / "train" / "b_mid" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = _ft_args(tmp_path / "data", tmp_path / "runs", "data.on_bad_file=fail", f"data.num_workers={workers}")
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error:" in x]
    assert e.value.code == 2 and "Traceback" not in err and len(line) == 1 and str(bad) in line[0], err
    assert "removed" in err and not (tmp_path / "runs" / "three").exists()
    bad.unlink()
    main(args)  # the same command, rerun after the fix, just runs
    assert (tmp_path / "runs" / "three" / "results.json").is_file()


# ------------------------------------------------------------------------------------------------ paths
def test_a_missing_fashion_mnist_root_is_an_error_not_the_system_copy(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as e:
        main(["pretrain", PRETRAIN, f"data.root={missing}", f"train.out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"data.root '{missing}' does not exist" in err and "data.root=null" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    (tmp_path / "empty").mkdir()  # a root that exists but holds no IDX files is refused too, naming it
    with pytest.raises(SystemExit):
        main(["pretrain", PRETRAIN, f"data.root={tmp_path / 'empty'}", f"train.out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert f"found in {tmp_path / 'empty'}," in err and "/usr/share/datasets" not in err  # not searched


def _one_line_exit_2(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_yaml_syntax_errors_name_the_file_and_line_or_the_override(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: beit_fmnist_patch4_32\ndata:\n  mean: [0.5, 0.5\n  root: x\n")
    err = _one_line_exit_2(["pretrain", str(bad), f"train.out_dir={tmp_path / 'runs'}"], capsys)
    assert f"{bad}: not valid YAML at line 5, column 7" in err
    err = _one_line_exit_2(["pretrain", PRETRAIN, "data.mean=[0.1", f"train.out_dir={tmp_path / 'runs'}"], capsys)
    assert "override 'data.mean=[0.1': the value is not valid YAML (line 1" in err
    assert not (tmp_path / "runs").exists()


def test_tokenizer_encode_of_a_file_that_is_not_an_image(tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    err = _one_line_exit_2(["tokenizer", "encode", "--tokenizer", "fmnist_dvae", str(text)], capsys)
    assert f"'{text}' is not an image PIL can read (UnidentifiedImageError" in err


def test_export_to_a_path_that_is_a_file(tmp_path, capsys):
    ckpt = _classifier_ckpt(tmp_path / "c.pt", ["a_dark", "b_mid", "c_light"])
    (tmp_path / "out").write_text("x")
    err = _one_line_exit_2(["export", str(ckpt), str(tmp_path / "out"), "--to", "hf"], capsys)
    assert f"export destination '{tmp_path / 'out'}' is a file" in err and (tmp_path / "out").read_text() == "x"


def test_a_truncated_shard_under_on_bad_file_fail_is_one_line_and_leaves_no_directory(tmp_path, capsys):
    _write_folder(tmp_path / "data", "train", list(LEVELS), 6)
    _write_folder(tmp_path / "data", "test", list(LEVELS), 2, seed=1)
    for split in ("train", "test"):
        with pytest.raises(SystemExit):  # exit code 0
            main(["data", "shard", str(tmp_path / "data"), str(tmp_path / "shards"), "--split", split,
                  "--images-per-shard", "6"])
    capsys.readouterr()
    shard = tmp_path / "shards" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut inside its second sample
    args = _ft_args(tmp_path / "data", tmp_path / "runs", "data.dataset=webdataset", f"data.root={tmp_path / 'shards'}",
                    "data.shards=train-{000000..000002}.tar", "data.eval_shards=test-000000.tar",
                    "data.on_bad_file=fail", "data.num_workers=1")
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error:" in x]
    assert e.value.code == 2 and "Traceback" not in err and len(line) == 1, err
    assert f"cannot read shard '{shard}'" in line[0] and "data.on_bad_file=skip" in line[0]
    assert not (tmp_path / "runs" / "three").exists()  # a rerun is not told "already exists"


# ------------------------------------------------------------------------------------------------ messages
def test_predict_on_a_classifier_says_it_is_a_classifier_not_that_a_tokenizer_needs_weights(tmp_path, capsys):
    from beit.train.runner import setup_logging

    ckpt = _classifier_ckpt(tmp_path / "c.pt", ["a_dark", "b_mid", "c_light"])
    setup_logging(None, False)  # warnings only, to this test's stderr (an earlier test's handler may be closed)
    err = _one_line_exit_2(["predict", str(ckpt), "--out", str(tmp_path / "p.png")], capsys)
    assert "is a classifier" in err and "--attention" in err and "weights" not in err and "dall" not in err.lower()


def test_a_channel_mismatch_says_channels_not_img_size():
    from beit.models import create_model

    model = create_model("beit_fmnist_patch4_32", depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError) as e:
        model(torch.zeros(1, 3, 32, 32))
    assert "expected images with 1 channel(s), got 3" in str(e.value) and "img_size" not in str(e.value)


@pytest.mark.parametrize("error,says", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304"), "disk full"),
    (OSError(28, "No space left on device"), "disk full"),
    (OSError(27, "File too large"), "file too large"),
])
def test_a_failed_first_checkpoint_write_says_why_and_that_there_is_none_before_it(tmp_path, monkeypatch, error, says):
    from beit.train import checkpoint as ckpt_io

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(ckpt_io.torch, "save", fail)
    with pytest.raises(ckpt_io.CheckpointWriteError) as e:
        ckpt_io.save_training_checkpoint(tmp_path, {"model": {}}, 4, keep_last=2)
    msg = str(e.value)
    assert f"could not write '{tmp_path / 'ckpt-00000004.pt'}': {says}" in msg
    assert "no checkpoint of this run was written before it" in msg and "--resume" not in msg
    assert "enforce fail" not in msg and not list(tmp_path.iterdir())  # no temp file left either
    if says == "disk full":
        assert f"no space left on the device holding '{tmp_path}'" in msg
    monkeypatch.undo()
    ckpt_io.save_training_checkpoint(tmp_path, {"model": {}}, 4, keep_last=2)
    monkeypatch.setattr(ckpt_io.torch, "save", fail)
    with pytest.raises(ckpt_io.CheckpointWriteError, match=r"earlier checkpoints .* intact \(newest "
                                                          r"ckpt-00000004.pt\).* --resume"):
        ckpt_io.save_training_checkpoint(tmp_path, {"model": {}}, 8, keep_last=2)


def test_eval_output_goes_beside_the_run_and_a_rerun_needs_no_flag(tmp_path, capsys, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where the stored train.out_dir ("runs") points
    run = tmp_path / "runs" / "three"
    run.mkdir(parents=True)
    ckpt = _classifier_ckpt(run / "best.pt", ["a_dark", "b_mid", "c_light"], root=str(tmp_path / "data"))
    (run / "config.yaml").write_text("{}\n")  # a run directory
    _write_folder(tmp_path / "data", "test", ["a_dark", "c_light"], 2)
    main(["eval", str(run)])  # the stored out_dir (elsewhere) is not where the results go
    main(["eval", str(ckpt)])  # again, no --overwrite: a new directory
    assert (tmp_path / "runs" / "fmnist_scratch_eval" / "results.json").is_file()
    assert (tmp_path / "runs" / "fmnist_scratch_eval-2" / "results.json").is_file()
    assert "already exists" not in capsys.readouterr().err and not (tmp_path / "cwd" / "runs").exists()


def test_eval_of_a_shipped_model_writes_under_runs(monkeypatch, tmp_path):
    from beit.hub import ZOO, command_config

    if not ZOO["fmnist-classifier"].is_file():
        pytest.skip("zoo weights not shipped in this checkout")
    monkeypatch.chdir(tmp_path)
    cfg = command_config("fmnist-classifier", [], "eval")
    assert cfg.train.out_dir == "runs" and cfg.train.run_name.endswith("_eval")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_file_is_counted_and_warned_once_per_run(tmp_path, capsys, workers):
    from beit.data import datasets as ds_mod

    _write_folder(tmp_path / "data", "train", list(LEVELS), 6)
    _write_folder(tmp_path / "data", "test", list(LEVELS), 2, seed=1)
    bad = tmp_path / "data" / "train" / "b_mid" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds_mod._WARNED.discard(str(bad))
    # one batch of all 19 files per epoch, 3 epochs: the bad file is drawn 3 times
    main(_ft_args(tmp_path / "data", tmp_path / "runs", f"data.num_workers={workers}", "data.batch_size=19"))
    summary = json.loads((tmp_path / "runs" / "three" / "summary.json").read_text())
    assert summary["num_bad_skipped"] == 1 and summary["bad_files"] == [str(bad)]
    err = capsys.readouterr().err
    assert err.count(f"skipping '{bad}'") == 1, err
    assert "1 undecodable files were skipped" in err
