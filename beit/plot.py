"""`beit plot RUN [RUN ...] [--out PNG]`: the curves of one or more runs from their metrics.jsonl.

One panel per quantity that any run logged — train loss, masked-token accuracy (pretraining) or train
accuracy, lr, img/s, and every evaluation metric (top-1, k-NN, ...) — with the runs overlaid and named
after their directories. x is the optimizer step.
"""

from __future__ import annotations

from pathlib import Path

# (split, key, panel title), in panel order; evaluation keys not listed get a panel of their own.
PANELS = [("train", "loss", "train loss"), ("train", "mlm_acc", "masked-token accuracy"),
          ("train", "acc", "train accuracy"), ("train", "lr", "learning rate"), ("train", "img_per_s", "img/s")]
_SKIP_EVAL = {"loss"}  # shown as "eval loss" only when asked for; top-1 is what people compare


def _series(rows: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def read_run(run: str | Path) -> list[dict]:
    from beit.train.metrics import read_metrics

    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in '{run}' (pass a run directory or a metrics.jsonl file)")
    return read_metrics(path)


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
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
    eval_keys = sorted({k for rows in data.values() for r in rows if r.get("split") == "eval"
                        for k, v in r.items() if isinstance(v, (int, float)) and k not in ("step", "time")
                        and k not in _SKIP_EVAL})
    panels = PANELS + [("eval", k, f"eval {k}") for k in eval_keys]
    panels = [p for p in panels if any(_series(rows, p[0], p[1])[0] for rows in data.values())]
    if not panels:
        raise ValueError(f"nothing to plot: no train/eval rows in {', '.join(map(str, runs))}")
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (split, key, title) in zip(axes.flat, panels):
        for i, (name, rows) in enumerate(data.items()):
            x, y = _series(rows, split, key)
            if x:  # one colour per run across panels
                ax.plot(x, y, color=f"C{i}", marker="o" if len(x) < 30 else None, ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=f"C{i}", label=name) for i, name in enumerate(data)]
    fig.legend(handles=handles, loc="upper right", fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def register(subparsers):
    p = subparsers.add_parser("plot", help="curves of one or more runs (loss, accuracy, lr, img/s, eval) as a PNG",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", default="runs.png", help="PNG to write (default: runs.png)")

    def run(a):
        print(f"wrote {plot_runs(a.runs, a.out)}")
        return 0

    p.set_defaults(func=run)
