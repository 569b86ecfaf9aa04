"""Run directories and training checkpoints: atomic writes, keep-last-N, exact resume.

A checkpoint is a plain dict loadable with `torch.load(weights_only=True)`:
`{"format_version", "model", "optimizer", "scaler", "step", "rng", "config", ...}`, with the *unwrapped*
model's state dict (no `module.` / `_orig_mod.` prefixes) so any loader can read it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

FORMAT_VERSION = 1
_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


class RunDirError(RuntimeError):
    pass


def check_run_dir(path: Path, resume: bool, overwrite: bool):
    """Never clobber a run: an existing non-empty directory needs --resume or --overwrite. Touches nothing."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite are mutually exclusive")
    exists = path.exists() and any(path.iterdir())
    if exists and not (resume or overwrite):
        raise RunDirError(
            f"run directory '{path}' already exists; pass --resume to continue it, --overwrite to replace "
            f"it, or choose another train.run_name / train.out_dir"
        )
    if resume and not exists:
        raise RunDirError(f"--resume given but '{path}' holds no run to resume")


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> Path:
    check_run_dir(path, resume, overwrite)
    if overwrite and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in run_dir.glob("ckpt-*.pt") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def atomic_save(obj: dict, path: Path):
    """Write to a temp file in the same directory, fsync, then rename: a crash never leaves a half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_training_checkpoint(run_dir: Path, state: dict, step: int, keep_last: int) -> Path:
    path = run_dir / f"ckpt-{step:08d}.pt"
    atomic_save({"format_version": FORMAT_VERSION, "step": step, **state}, path)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
    return path


def load_training_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise RunDirError(f"cannot read checkpoint '{path}': {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise RunDirError(f"'{path}' is not a beit training checkpoint (format_version {FORMAT_VERSION})")
    return ckpt


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
