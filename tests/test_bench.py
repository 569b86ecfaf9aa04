"""`beit bench` and scripts/gpu_check.py: they run end to end and report consistent numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from beit import bench
from beit.cli import main
from beit.experiments.fashion_mnist import CONFIGS

ROOT = Path(__file__).resolve().parent.parent


def test_count_flops_linear_forward_backward():
    # By hand: forward 2·B·I·O, backward 2·B·I·O for the input grad and 2·B·I·O for the weight grad.
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    assert bench.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 32 * 16


def test_time_alternating_takes_the_median_round():
    calls = []
    steps = [bench.Step("a", lambda: calls.append("a"), 1), bench.Step("b", lambda: calls.append("b"), 1)]
    times = bench.time_alternating(steps, torch.device("cpu"), iters=2, repeats=3)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert calls == ["a", "a", "b", "b"] * 3  # round-robin, not all of a then all of b


def test_bench_cli_finetune_row_vs_timm(tmp_path, capsys):
    out = tmp_path / "b.json"
    main(["bench", "--preset", "beit_fmnist_patch4_32", "--batch", "4", "--device", "cpu", "--warmup", "0",
          "--iters", "1", "--repeats", "1", "--profile", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["ours", "timm"]
    ours, timm = rows
    # Same architecture, so the counted FLOPs agree closely (timm and ours differ only in tiny ops).
    assert ours["gflop_per_img"] == pytest.approx(timm["gflop_per_img"], rel=0.02)
    assert timm["ours_speedup"] == pytest.approx(timm["ms_per_step"] / ours["ms_per_step"])
    printed = capsys.readouterr().out
    assert "timm" in printed
    assert "aten::" in printed and "Self CPU" in printed  # --profile: the operator table of our step


def test_gpu_check_tiny_runs_every_section(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "gc.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--device", "cpu",
           "--budget", "100000", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report["errors"] and not report["skipped"]
    assert set(report["sections"]) == {"bf16 batch 1", "bf16 batch 2", "fp16+scaler batch 2", "fsdp bf16 batch 1",
                                       "fmnist loop"}
    base = {r["impl"]: r for r in report["sections"]["bf16 batch 2"]["rows"]}
    assert set(base) == {"ours", "hf", "tokenizer"}
    # Ours and HF run the same ViT and the same tokenizer: FLOPs agree up to HF's lm_head on every token.
    assert base["hf"]["gflop_per_img"] >= base["ours"]["gflop_per_img"] > base["tokenizer"]["gflop_per_img"] > 0
    # The share is the tokenizer's time alone over the whole step's (a timing ratio, so no bound under load).
    share = base["tokenizer"]["ms_per_step"] / base["ours"]["ms_per_step"]
    assert base["ours"]["tokenizer_share"] == pytest.approx(share)
    fsdp = report["sections"]["fsdp bf16 batch 1"]["rows"][0]
    assert fsdp["gflop_per_img"] == pytest.approx(report["sections"]["bf16 batch 1"]["rows"][0]["gflop_per_img"])
    loop = report["sections"]["fmnist loop"]["rows"][-1]
    assert loop["impl"] == "loop" and loop["steps_timed"] >= 1 and loop["loop_img_per_s"] > 0


def test_loop_vs_step_pairs_each_loop_round_with_the_step_round_after_it(monkeypatch):
    # A drifting machine: the ratio must come from each round's own pair, not from the two medians
    # (here the medians would give 90/100 = 0.9, while the rounds' ratios are 1.0, 0.5 and 1.0).
    loops, steps, calls = iter([100.0, 50.0, 90.0]), iter([100.0, 100.0, 90.0]), []

    def fake_loop(config, device, steps, overrides):
        calls.append("loop")
        return {"config": config, "batch": 128, "steps_timed": steps, "num_workers": 1, "loop_img_per_s": next(loops)}

    def fake_time(step_list, device, iters, repeats):
        calls.append("step")
        return {step_list[0].name: step_list[0].batch / next(steps)}

    monkeypatch.setattr(bench, "run_loop", fake_loop)
    monkeypatch.setattr(bench, "time_alternating", fake_time)
    monkeypatch.setattr(bench, "prepare", lambda build, device, warmup: bench.Step("ours", lambda: None, 128))
    out = bench.loop_vs_step(str(CONFIGS / "pretrain" / "fmnist.yaml"), torch.device("cpu"), steps=5, rounds=3)
    assert calls == ["loop", "step"] * 3
    assert out["loop_over_step"] == pytest.approx(1.0)
    assert out["loop_img_per_s"] == 90.0 and out["step_img_per_s"] == 100.0


def test_bench_cli_loop_runs_the_real_loop_and_its_step(tmp_path, capsys):
    out = tmp_path / "b.json"
    main(["bench", "--preset", "beit_fmnist_patch4_32_512_vocab", "--batch", "4", "--device", "cpu", "--no-baselines",
          "--warmup", "0", "--iters", "1", "--repeats", "1", "--loop", "1", "--loop-rounds", "2",
          "--loop-set", "data.batch_size=8", "data.num_workers=0", "data.train_subset=256", "--json", str(out)])
    loop = json.loads(out.read_text())["loop"]
    assert loop["batch"] == 8 and loop["num_workers"] == 0 and loop["rounds"] == 2
    assert len(loop["rounds_loop_img_per_s"]) == len(loop["rounds_step_img_per_s"]) == 2
    assert loop["loop_over_step"] > 0
    assert "median ratio" in capsys.readouterr().out


def test_bench_cli_compile_scopes_time_each_scope_against_the_first(tmp_path, capsys):
    out = tmp_path / "b.json"
    main(["bench", "--preset", "beit_fmnist_patch4_32_512_vocab", "--batch", "2", "--device", "cpu",
          "--compile-scopes", "eager", "blocks", "--warmup", "1", "--iters", "1", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["scope"] for r in rows] == ["eager", "blocks"]
    assert rows[0]["speedup_over_first"] == 1.0 and all(r["img_per_s"] > 0 and r["build_s"] > 0 for r in rows)
    assert rows[1]["speedup_over_first"] == pytest.approx(rows[0]["ms_per_step"] / rows[1]["ms_per_step"])
    assert "x eager" in capsys.readouterr().out


def test_compile_scopes_refuse_a_classifier_preset():
    with pytest.raises(ValueError, match="'beit_fmnist_patch4_32' has no vocab_size"):
        bench.compile_scope_rows("beit_fmnist_patch4_32", 2, torch.device("cpu"))


def test_bench_cli_data_items_alone_times_the_pretraining_pipeline(tmp_path, capsys):
    out = tmp_path / "b.json"
    main(["bench", "--row", "none", "--device", "cpu", "--data-items", "8", "--loop-set", "data.train_subset=64",
          "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report) == {"data"}  # no row was timed
    assert report["data"]["items"] == 8 and report["data"]["cpu_ms_per_item"] > 0
    assert report["data"]["config"].endswith("pretrain/fmnist.yaml")
    assert "ms of CPU per item" in capsys.readouterr().out
