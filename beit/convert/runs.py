"""The weights a run directory stands for: `beit.train` writes `ckpt-<step>.pt` (and `best.pt`) there; every
reader (`beit.load`, `model.pretrained`, segmenter loading) resolves a run directory here."""

from __future__ import annotations

import re
from pathlib import Path

_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in run_dir.glob("ckpt-*.pt") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def run_weights(run_dir: Path) -> Path | None:
    """The weights a run directory stands for: its newest ckpt-*.pt, else best.pt, else None."""
    found = list_checkpoints(run_dir)
    if found:
        return found[-1]
    best = run_dir / "best.pt"
    return best if best.is_file() else None


def resolve_pretrained(path: str | None) -> str | None:
    """`model.pretrained` may name a run directory (e.g. runs/fmnist_quick): use its newest ckpt-*.pt."""
    if not path or not Path(path).is_dir():
        return path
    weights = run_weights(Path(path))
    return str(weights) if weights else path  # else maybe an HF directory; load_pretrained decides
