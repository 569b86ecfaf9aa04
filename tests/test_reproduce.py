"""`beit reproduce`: every variant's stages are valid runs, and the driver skips what is done and resumes.

The real stages take minutes to hours (docs/results/fashion_mnist.md); here a fake runner stands in for
them, writing the files a finished stage leaves, so the driver's bookkeeping is what is tested.
"""

import json

import pytest

import beit.experiments.fashion_mnist as rep
from beit.config import load_config


@pytest.mark.parametrize("variant", sorted(rep.VARIANTS))
def test_every_stage_of_every_variant_is_a_valid_run(tmp_path, variant):
    stages = rep.plan(tmp_path, variant, retrain_tokenizer=True)
    names = [s.name for s in stages]
    assert len(set(names)) == len(names)
    assert names[:2] == ["tokenizer", "pretrain"]
    fractions = rep.VARIANTS[variant]["finetune"]
    assert all("_100pct_" in n for n in names[len(names) - 2:]) == (1.0 in fractions)  # the costly runs last
    for s in stages:
        assert s.config.is_file(), s.config  # shipped with the package (beit/configs)
        cfg = load_config(s.config, s.overrides)  # a mistyped override in VARIANTS fails here
        assert cfg.train.run_name == s.name
    smallest = min(fractions)
    for init in ("pretrained", "scratch"):
        runs = [n for n in names if n.startswith(f"finetune_{init}_{rep._pct(smallest)}pct_")]
        assert len(runs) == rep.VARIANTS[variant]["seeds"]
    pretrained = [s for s in stages if s.name.startswith("finetune_pretrained")]
    assert all(f"model.pretrained={tmp_path / 'pretrain'}" in s.overrides for s in pretrained)
    # pretrained and scratch runs differ only in the init (and the run name): the claim's controlled comparison
    for p in pretrained:
        twin = next(s for s in stages if s.name == p.name.replace("pretrained", "scratch"))
        strip = lambda s: [o for o in s.overrides if not o.startswith(("model.pretrained=", "train.run_name="))]
        assert strip(p) == strip(twin)


def test_reruns_skip_finished_stages_and_report_mean_std(tmp_path, fake_stage_runner):
    def finish(command, cfg, d):
        if command == "knn":
            (d / "results.json").write_text(json.dumps({"k": 20, "temperature": 0.07, "top1": 70.0}))
            return
        top1 = None
        if command == "finetune":
            top1 = (80.0 if cfg.model.pretrained else 60.0) + cfg.train.seed  # seeds 0, 1, 2
        (d / "summary.json").write_text(json.dumps({"steps": 1, "eval": {"top1": top1}}))

    calls = fake_stage_runner(finish)
    results = rep.reproduce(tmp_path, "quick")
    first = list(calls)
    assert first[0] == "pretrain" and len(first) == len(rep.plan(tmp_path, "quick"))
    one = results["finetune_top1"]["1"]
    assert one["pretrained"]["runs"] == [80.0] and one["gain_pp"] == 20.0
    assert results["knn"]["top1"] == 70.0 and results["pending_stages"] == []
    assert "| 1% | 80.00 | 60.00 | +20.00 |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["finetune_top1"]["100"]["gain_pp"] == 20.0
    assert (tmp_path / "curves.png").is_file()

    calls.clear()
    rep.reproduce(tmp_path, "quick")
    assert calls == []  # everything is done: nothing reruns

    (tmp_path / "finetune_scratch_10pct_seed0" / "summary.json").unlink()  # as if stopped mid-stage
    report = rep.report(tmp_path, "quick")
    assert report["pending_stages"] == ["finetune_scratch_10pct_seed0"]
    assert "scratch" not in report["finetune_top1"]["10"]
    assert "Not run yet" in (tmp_path / "results.md").read_text()
    rep.reproduce(tmp_path, "quick")
    assert calls == ["finetune_scratch_10pct_seed0"]


def test_several_seeds_give_mean_and_std(tmp_path):
    stages = [rep.Stage(f"finetune_{init}_1pct_seed{s}", "finetune", rep.CONFIGS / "finetune" / "fmnist.yaml",
                        [f"train.run_name=finetune_{init}_1pct_seed{s}"], init=init, label_fraction=0.01)
              for init in ("pretrained", "scratch") for s in range(3)]
    for s in stages:
        (tmp_path / s.name).mkdir()
        top1 = {"pretrained": 75.0, "scratch": 50.0}[s.init] + int(s.name[-1])
        (tmp_path / s.name / "summary.json").write_text(json.dumps({"eval": {"top1": top1}}))
    row = rep.collect(tmp_path, stages, "full", {})["finetune_top1"]["1"]
    assert row["pretrained"]["mean"] == 76.0 and row["scratch"]["mean"] == 51.0
    assert row["pretrained"]["std"] == pytest.approx(1.0)  # sample std of 75, 76, 77
    assert row["gain_pp"] == 25.0


def test_stages_runs_only_the_named_ones_and_wall_time_adds_up_over_stops(tmp_path, fake_stage_runner):
    def finish(command, cfg, d):
        if cfg.train.run_name == "pretrain" and not (d / "stopped").exists():
            (d / "stopped").write_text("")  # the first call is stopped (as by SIGTERM), the second finishes
            raise SystemExit(75)
        (d / "summary.json").write_text(json.dumps({"steps": 1, "eval": {"top1": 50.0}}))

    calls = fake_stage_runner(finish)
    only = ["pretrain", "finetune_pretrained_100pct_seed0"]
    with pytest.raises(SystemExit):
        rep.reproduce(tmp_path, "quick", only=only)
    first = json.loads((tmp_path / rep.WALL_TIME).read_text())["pretrain"]  # a stopped stage's time is kept
    results = rep.reproduce(tmp_path, "quick", only=only)
    assert calls == ["pretrain", "pretrain", "finetune_pretrained_100pct_seed0"]
    wall = json.loads((tmp_path / rep.WALL_TIME).read_text())
    assert set(wall) == set(only) and wall["pretrain"] >= first
    assert "finetune_scratch_100pct_seed0" in results["pending_stages"]  # reported as not run yet
    with pytest.raises(ValueError, match="no stage finetune_pretrained_50pct_seed0 in the quick variant"):
        rep.reproduce(tmp_path, "quick", only=["finetune_pretrained_50pct_seed0"])


def test_demo_keeps_to_its_time_budget_by_shortening_every_run_alike(tmp_path, monkeypatch, fake_stage_runner, capsys):
    """On a machine too slow for the standard demo, `beit demo --minutes M` shortens pretraining and both
    fine-tuning runs by one factor so that its predicted time is M; the plan is kept for a rerun."""
    seen = []

    def finish(command, cfg, d):
        seen.append((cfg.train.run_name, cfg.train.epochs, cfg.optim.warmup_epochs, cfg.train.eval_every_epochs))
        top1 = 50.0 if cfg.model.pretrained else 40.0
        (d / "summary.json").write_text(json.dumps({"steps": 1, "eval": {"top1": top1}}))

    fake_stage_runner(finish)
    standard = {s.name: load_config(s.config, s.overrides, command=s.command) for s in rep.plan(tmp_path, "demo")}
    monkeypatch.setattr(rep, "time_pretrain_step", lambda: 0.1)  # fast: the standard demo fits 9 minutes
    assert rep.demo_plan(tmp_path / "fast", 9)["scale"] == 1.0
    monkeypatch.setattr(rep, "time_pretrain_step", lambda: 5.0)  # slow: it does not
    assert rep.demo_plan(tmp_path / "whole", 0)["scale"] == 1.0  # --minutes 0: no budget

    rep.demo(tmp_path, 9)
    budget = json.loads((tmp_path / rep.DEMO_PLAN).read_text())
    assert 0.1 < budget["scale"] < 1 and budget["predicted_s"] == pytest.approx(9 * 60)
    assert budget["standard_s"] > 9 * 60
    assert [name for name, *_ in seen] == list(standard)
    for name, epochs, warmup, every in seen:
        cfg = standard[name]
        assert epochs == pytest.approx(cfg.train.epochs * budget["scale"], rel=1e-3)
        assert warmup == pytest.approx(cfg.optim.warmup_epochs * budget["scale"], rel=1e-3)
        if name != "pretrain":  # one evaluation, at the end, as in the standard demo
            assert every == pytest.approx(epochs)
    assert f"shortened to {budget['scale']:.0%}" in capsys.readouterr().out

    monkeypatch.setattr(rep, "time_pretrain_step", lambda: pytest.fail("a rerun re-timed the machine"))
    assert rep.demo_plan(tmp_path, 5) == budget  # a rerun resumes the first plan
