"""FSDP2 and distributed evaluation on CPU (2 gloo processes, tiny models): FSDP follows the single-process
loss curve, its checkpoints resume with a different process count and load with `beit.load`, and evaluation
sharded over 2 ranks returns what one process computes."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit.train.metrics import read_metrics
from test_pretrain import TINY, run, write_config

# amp none, no drop path, exact mask counts: the only differences between 1 and 2 processes are reduction order.
EXACT = {"train": {"max_steps": 6, "log_every": 1, "amp": "none", "save_every_steps": 3},
         "model": {"drop_path_rate": 0.0}, "data": {"mask_mode": "exact"}}
HALF = {"mask_mode": "exact", "batch_size": 16}  # per process: the same global batch of 32 on 2 processes


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]


def _final_weights(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / f"ckpt-{step:08d}.pt", weights_only=True)["model"]


@pytest.mark.fmnist
def test_fsdp_matches_one_process_and_resumes_on_another_count(tmp_path):
    for d in ("one", "fsdp", "resumed", "one_to_fsdp"):
        (tmp_path / d).mkdir()
    # the uninterrupted 1-process reference: 8 steps, checkpoints at 3, 6 and 8 (the last two kept)
    one = write_config(tmp_path / "one", **{**EXACT, "train": {**EXACT["train"], "max_steps": 8}})
    run("pretrain", str(one))
    one_dir = tmp_path / "one" / "runs" / "cfg"
    # FSDP with gradient accumulation: 8 per process x 2 micro-batches x 2 processes = the same global batch.
    fsdp = write_config(tmp_path / "fsdp", **{**EXACT, "data": {**HALF, "batch_size": 8}, "optim": {"accum_steps": 2},
                                              "dist": {"strategy": "fsdp"}})
    run("pretrain", str(fsdp), nproc=2)
    ref, got = losses(one_dir), losses(tmp_path / "fsdp" / "runs" / "cfg")
    assert len(ref) == 8 and len(got) == 6 and ref[5] < ref[0]
    assert got == pytest.approx(ref[:6], rel=1e-4, abs=1e-4)

    # The 2-process FSDP run as if killed after step 3, resumed in 1 plain process without accumulation: it
    # ends where the 1-process run does.
    run_dir = tmp_path / "resumed" / "runs" / "cfg"
    shutil.copytree(tmp_path / "fsdp" / "runs" / "cfg", run_dir)
    (run_dir / "ckpt-00000006.pt").unlink()
    ckpt = torch.load(run_dir / "ckpt-00000003.pt", weights_only=True)
    assert ckpt["model"]["blocks.0.attn.qkv.weight"].shape == (3 * 64, 64)  # gathered, not a shard
    assert set(ckpt["optimizer"]["state"]) == set(range(len(ckpt["optimizer"]["state"])))  # plain layout
    rest = write_config(tmp_path / "resumed", **EXACT)
    run("pretrain", str(rest), "--resume")
    assert losses(run_dir)[3:] == pytest.approx(ref[3:6], rel=1e-4, abs=1e-4)
    a, b = _final_weights(one_dir, 6), _final_weights(run_dir, 6)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)

    # ...and the 1-process run as if killed after step 6, resumed under 2-process FSDP: its steps 7-8 and its
    # final weights are the uninterrupted run's.
    moved = tmp_path / "one_to_fsdp" / "runs" / "cfg"
    shutil.copytree(one_dir, moved)
    (moved / "ckpt-00000008.pt").unlink()
    more = write_config(tmp_path / "one_to_fsdp", **{**EXACT, "train": {**EXACT["train"], "max_steps": 8},
                                                     "data": HALF, "dist": {"strategy": "fsdp"}})
    run("pretrain", str(more), "--resume", nproc=2)
    assert losses(moved) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    a, b = _final_weights(one_dir, 8), _final_weights(moved, 8)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)

    # the FSDP run's checkpoint loads with beit.load into the model the 1-process run trained (same outputs)
    import beit
    from beit.models import create_model

    model = beit.load(tmp_path / "fsdp" / "runs" / "cfg")
    hand = create_model(TINY["model"]["name"], **{k: v for k, v in TINY["model"].items() if k != "name"})
    hand.load_state_dict(_final_weights(one_dir, 6))
    x, mask = torch.randn(2, 1, 32, 32), torch.rand(2, 64) < 0.4
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), hand.eval()(x, mask), rtol=1e-3, atol=1e-4)


@pytest.mark.fmnist
def test_sharded_evaluation_equals_one_process(tmp_path):
    """Top-1/top-5/loss, k-NN, probe features and segmentation metrics over 2 ranks (uneven shards; FSDP
    too for classification) = 1 process."""
    out = tmp_path / "eval.json"
    with socket.socket() as s:  # a free port: other test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          port, str(Path(__file__).with_name("_dist_eval.py")), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    single = r["single"]
    assert len(single["labels"]) == 21
    assert 0 < single["loss"]
    for got in (r["sharded"], r["fsdp"]):
        for k in ("top1", "top5", "knn_top1", "knn_top5"):
            assert got[k] == single[k], k
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert r["sharded"]["labels"] == single["labels"]
    # each rank forwarded its own share (11 and 10 images, then rank 1 repeats a forward to match rank 0's
    # batch count), not the whole set
    assert single["batches"] == [[10, 10, 1]]
    assert r["sharded"]["batches"] == [[10, 1], [10, 10]]
    assert r["sharded"]["probe_features"] == pytest.approx(single["probe_features"], rel=1e-5, abs=1e-6)
    # segmentation: per-class pixel counts summed over ranks give exactly the one-process metrics
    assert single["seg"]["aAcc"] > 0 and r["sharded"]["seg"] == single["seg"]


def test_fsdp_config_limits_are_errors():
    from beit.config import Config, check_machine

    for bad, msg in (({"dist": {"strategy": "fsdp"}, "train": {"ema_decay": 0.999}}, "ema_decay"),
                     ({"dist": {"strategy": "fsdp"}, "train": {"amp": "fp16", "device": "cpu"}}, "shard-aware"),
                     ({"dist": {"fsdp_cpu_offload": True}}, "needs dist.strategy=fsdp"),
                     ({"dist": {"strategy": "fsdp", "fsdp_cpu_offload": True}, "train": {"device": "cpu"}},
                      "offloads from a GPU")):
        with pytest.raises(ValueError, match=msg):
            check_machine(Config.model_validate(bad))  # schema errors first, then this machine's
