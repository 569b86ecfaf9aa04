"""`beit study STUDY [key=value ...]`: argument parsing only; the driver is beit/experiments/study.py."""

from __future__ import annotations

from pathlib import Path


def register(subparsers):
    p = subparsers.add_parser(
        "study", help="pretrained vs scratch on any dataset: each arm tuned on validation, seeds with 95%% "
        "intervals, a pixel k-NN reference, test once (resumable)",
        description="See beit/experiments/study.py and docs/results/fashion_mnist.md. Writes results.json, "
        "results.md and study.png in the output folder; rerun to continue.")
    p.add_argument("study", help="study file, e.g. configs/study/fmnist.yaml")
    p.add_argument("overrides", nargs="*", help="study keys (seeds=1) or run keys with a section (data.root=/x)")
    p.add_argument("--out", default=None, help="output folder (default runs/study_<file stem>)")
    p.add_argument("--fractions", default=None, type=lambda s: [float(x) for x in s.split(",")],
                   help="run only these label fractions now (e.g. 0.01); the report covers all")
    p.add_argument("--arms", default=None, type=lambda s: s.split(","),
                   help="run only these arms now (e.g. scratch; pretrained, scratch, cnn): two processes can share "
                   "the work; the report covers all")
    p.add_argument("--report-only", action="store_true", help="run nothing; tabulate what has finished")
    p.set_defaults(func=_study)


def _study(a) -> int:
    from beit.experiments.study import load_study, run_study

    study = load_study(a.study, a.overrides)
    run_study(study, Path(a.out or f"runs/study_{Path(a.study).stem}"), a.fractions, a.report_only, a.arms)
    return 0
