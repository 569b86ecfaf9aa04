"""`beit plot RUN [RUN ...] [--out PNG]`: argument parsing only; the figure is drawn by beit/plot.py."""

from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("plot", help="curves of one or more runs (loss, accuracy, lr, img/s, eval) as a PNG",
                              description="`beit plot RUN [RUN ...] [--out PNG]`: the curves of one or more runs "
                                          "from their metrics.jsonl.")
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", default="runs.png", help="PNG to write (default: runs.png)")
    p.set_defaults(func=run_plot)


def run_plot(a) -> int:
    from beit.plot import plot_runs

    print(f"wrote {plot_runs(a.runs, a.out)}")
    return 0
