"""`beit plot RUN [RUN ...] [--out PNG]`: the curves of one or more runs from their metrics.jsonl.

One panel per quantity that any run logged — train loss, masked-token accuracy (pretraining), accuracy
(train and eval top-1 in one panel), lr, img/s, and every other evaluation metric (top-5, k-NN, mIoU, ...) —
with the runs overlaid (one colour each, named after their directories in the legend). x is the optimizer
step; every y axis says what it shows, and every accuracy is in percent (metrics.jsonl logs training
accuracies as 0-1 fractions, evaluation ones in percent).
"""

from __future__ import annotations

import re
from pathlib import Path

from beit.train.metrics import read_metrics

# A panel: (title, y-axis label, its series), a series being (split, key, scale, line style, legend text).
# Every accuracy is drawn in percent: metrics.jsonl logs training accuracies as fractions (acc, mlm_acc) and
# evaluation accuracies in percent (top1, knn_top1, mIoU, ...), so the fractions are scaled by 100.
PCT = "accuracy (%)"
PANELS = [
    ("train loss", "loss", [("train", "loss", 1.0, "-", "")]),
    ("masked-token accuracy", PCT, [("train", "mlm_acc", 100.0, "-", "")]),
    ("accuracy", PCT, [("train", "acc", 100.0, "--", "train (training batches)"),
                       ("eval", "top1", 1.0, "-", "eval top-1")]),
    ("learning rate", "learning rate", [("train", "lr", 1.0, "-", "")]),
    ("throughput", "images / s", [("train", "img_per_s", 1.0, "-", "")]),
]
_NOT_PLOTTED = {"step", "time", "epoch", "loss", "top1"}  # eval keys without a panel of their own
_PERCENT = re.compile(r"(knn_)?top\d+(_layer\d+)?")


def eval_ylabel(key: str) -> str:
    """The y-axis label of an evaluation metric's panel (every one is labelled)."""
    base = key.removeprefix("ema_")
    if _PERCENT.fullmatch(base):
        return PCT
    if base in ("mIoU", "mAcc", "aAcc"):
        return f"{base} (%)"
    return {"loss": "loss", "best_layer": "layer"}.get(base, base)


def _series(rows: list[dict], split: str, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v * scale for _, v in pts]


def read_run(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in '{run}' (pass a run directory or a metrics.jsonl file)")
    return read_metrics(path)


def _panels(data: dict[str, list[dict]]) -> list[tuple]:
    """The panels any run has data for: PANELS, then one per other evaluation metric."""
    eval_keys = sorted({k for rows in data.values() for r in rows if r.get("split") == "eval"
                        for k, v in r.items() if isinstance(v, (int, float)) and k not in _NOT_PLOTTED})
    panels = PANELS + [(f"eval {k}", eval_ylabel(k), [("eval", k, 1.0, "-", "")]) for k in eval_keys]
    return [p for p in panels if any(_series(rows, split, key)[0] for rows in data.values()
                                     for split, key, *_ in p[2])]


def _draw_panel(ax, panel: tuple, data: dict[str, list[dict]]):
    """One panel: every run in its colour, every series of the panel in its line style (legend if several)."""
    from matplotlib.lines import Line2D

    title, ylabel, series = panel
    drawn = []
    for split, key, scale, style, what in series:
        for i, rows in enumerate(data.values()):
            x, y = _series(rows, split, key, scale)
            if x:  # one colour per run across panels
                ax.plot(x, y, color=f"C{i}", ls=style, marker="o" if len(x) < 30 else None, ms=3)
                if what not in drawn:
                    drawn.append(what)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if ylabel == "learning rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    styles = {what: style for *_, style, what in series}
    if len(series) > 1:  # which line is which series; the colours (runs) are in the figure legend
        ax.legend(handles=[Line2D([], [], color="0.3", ls=styles[w], label=w) for w in drawn], fontsize=7)
    ax.grid(alpha=0.3)


def curves_figure(runs: list[str | Path]):
    """The matplotlib Figure of `beit plot`: one panel per quantity, the runs overlaid (one colour each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = [Path(r) if Path(r).is_dir() else Path(r).parent for r in runs]
    names = [d.name for d in dirs]
    # two runs of the same name (e.g. a/ft and b/ft) are told apart by their parent folder
    names = [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]
    if len(set(names)) < len(names):
        raise ValueError(f"the same run is given twice: {', '.join(map(str, runs))}")
    data = {name: read_run(r) for name, r in zip(names, runs)}
    panels = _panels(data)
    if not panels:
        raise ValueError(f"nothing to plot: no train/eval rows in {', '.join(map(str, runs))}")
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n + 0.4), squeeze=False,
                             layout="constrained")
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel, data)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=f"C{i}", label=name) for i, name in enumerate(data)]
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 6), fontsize=7, title="run",
               title_fontsize=7)
    return fig


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    fig = curves_figure(runs)
    import matplotlib.pyplot as plt  # after curves_figure chose the Agg backend

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
