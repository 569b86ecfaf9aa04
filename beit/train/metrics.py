"""Metric sinks: JSONL (one object per logged step), TensorBoard, and a progress bar with img/s and ETA."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path


class MetricWindow:
    """Averages scalars over the steps since the last flush; NaN/inf values are counted, not averaged."""

    def __init__(self):
        self.sums, self.counts, self.nonfinite = defaultdict(float), defaultdict(int), defaultdict(int)

    def add(self, **values: float):
        for k, v in values.items():
            if v is None:
                continue
            v = float(v)
            if math.isfinite(v):
                self.sums[k] += v
                self.counts[k] += 1
            else:
                self.nonfinite[k] += 1

    def state_dict(self) -> dict:
        """The steps not yet logged: saved in checkpoints so a resumed run logs the same windows."""
        return {"sums": dict(self.sums), "counts": dict(self.counts), "nonfinite": dict(self.nonfinite)}

    def load_state_dict(self, state: dict):
        self.__init__()
        for key in ("sums", "counts", "nonfinite"):
            getattr(self, key).update(state.get(key, {}))

    def flush(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        self.__init__()
        return out


class MetricLogger:
    def __init__(self, run_dir: Path | None, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled and run_dir is not None
        self.jsonl = self.tb = None
        if self.enabled:
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, split: str, values: dict[str, float]):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def read_metrics(path: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]
