"""Typed config: typos are errors that name the key, overrides are typed, every shipped config validates."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from beit.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_mistyped_key_names_it_with_a_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "wieght_decay": 0.05}}))
    with pytest.raises(ConfigError, match=r"'optim\.wieght_decay'.*Did you mean 'optim\.weight_decay'"):
        load_config(p)


def test_mistyped_override_and_section():
    with pytest.raises(ConfigError, match=r"'train\.epoch'.*Did you mean 'train\.epochs'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'"):
        load_config(None, ["modle.name=x"])


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"'optim\.lr'.*'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'data\.mask_mode'"):
        load_config(None, ["data.mask_mode=random"])


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(None, ["optim.lr=2e-3", "data.crop_scale=[0.2, 1.0]", "model.pretrained=null"])
    assert cfg.optim.lr == 2e-3 and cfg.data.crop_scale == (0.2, 1.0) and cfg.model.pretrained is None
    again = load_config(_write(tmp_path, cfg.to_yaml()))  # the resolved config round-trips through YAML
    assert again.to_dict() == {**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "run_name": "again"}}


def _write(tmp_path, text):
    p = tmp_path / "again.yaml"
    p.write_text(text)
    return p


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")), ids=str)
def test_every_shipped_config_validates_and_says_how_to_run_it(path):
    text = (ROOT / path).read_text()
    assert text.startswith("#") and "beit " in text.split("\n\n")[0], f"{path} must open with its command"
    if path.parts[1] == "study":  # a study file: its every run config is validated by load_study
        from beit.experiments.study import load_study

        load_study(ROOT / path)
    else:
        load_config(ROOT / path)


def test_finetuning_does_not_inherit_pretraining_defaults(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n")  # clip_grad and warmup_epochs left out
    pre, ft = load_config(path), load_config(path, command="finetune")
    assert (pre.optim.clip_grad, pre.optim.warmup_epochs) == (3.0, 10)  # pretraining (official run_beit_pretraining)
    assert (ft.optim.clip_grad, ft.optim.warmup_epochs) == (None, 5)  # official run_class_finetuning defaults
    assert load_config(path, ["optim.clip_grad=1.0"], command="finetune").optim.clip_grad == 1.0  # overrides win


def test_cli_help_does_not_import_torch():
    # Every `beit` command builds the whole parser first; each area's register() must leave torch (and
    # numpy, matplotlib, transformers) to the command that runs, or `beit --help` takes seconds and ~700 MB.
    code = ("import sys; from beit.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'transformers', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_convert_cli_layouts_match_the_library():
    from beit.cli.convert import LAYOUTS as CLI_LAYOUTS
    from beit.convert import LAYOUTS

    assert CLI_LAYOUTS == LAYOUTS


def test_export_cli_formats_match_the_library():
    from beit.cli.export import FORMATS as CLI_FORMATS
    from beit.export import FORMATS

    assert CLI_FORMATS == FORMATS


def test_a_stored_gpu_config_still_loads_on_a_cpu_only_machine():
    """A checkpoint of an fp16 GPU run keeps its config; reading it for evaluation must not need CUDA. Only a
    config about to run here is checked against this machine: the refusal of `train.amp=fp16` without CUDA
    (one line, no run directory) is test_reliability.py::test_bad_value_is_one_line_before_anything_is_created."""
    from beit.config import config_from_dict

    cfg = config_from_dict({"train": {"amp": "fp16", "device": "cuda"}})
    assert cfg.train.amp == "fp16" and cfg.train.device == "cuda"


def test_amp_auto_is_bf16_only_where_the_hardware_runs_it(monkeypatch, caplog):
    """`train.amp: auto` (the default) autocasts to bf16 on hardware with native bf16 and runs fp32 elsewhere
    (an AVX2 CPU emulates bf16, 16x slower: docs/performance.md); an explicit bf16 is kept, with a warning."""
    import torch

    from beit.config import Config
    from beit.train import loop

    cpu = torch.device("cpu")
    assert Config().train.amp == "auto"
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loop, "fast_bf16", lambda device, native=native: native)
        assert loop.resolve_amp("auto", cpu) == ("bf16" if native else "none")
        with loop.autocast(cpu, "auto"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
        assert loop.resolve_amp("none", cpu) == "none"
    loop._warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="beit"):
        assert loop.resolve_amp("bf16", cpu) == "bf16"
    assert "train.amp=bf16 on cpu, which has no native bf16" in caplog.text
