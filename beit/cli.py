"""`beit` command line. Each sub-command is a thin shell over a library function."""

from __future__ import annotations

import argparse
import os
import sys

from beit.config import ConfigError
from beit.train.eval_cli import add_train_command  # noqa: F401  (also reached as beit.cli.add_train_command)
from beit.train.eval_cli import register as register_train


def build_parser() -> argparse.ArgumentParser:
    from beit import __version__
    from beit.bench_cli import register as register_bench
    from beit.convert_cli import register as register_convert
    from beit.data_cli import register as register_data
    from beit.export import register as register_export
    from beit.reproduce_cli import register as register_reproduce
    from beit.plot import register as register_plot
    from beit.tokenizer_cli import register as register_tokenizer
    from beit.visualize import register as register_predict

    parser = argparse.ArgumentParser(prog="beit", description="BEiT: BERT pre-training of image transformers")
    parser.add_argument("--version", action="version", version=f"beit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_train(sub)
    register_predict(sub)
    register_tokenizer(sub)
    register_convert(sub)
    register_data(sub)
    register_export(sub)
    register_plot(sub)
    register_reproduce(sub)
    register_study(sub)
    register_bench(sub)
    return parser


def register_study(subparsers):
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
    p.add_argument("--report-only", action="store_true", help="run nothing; tabulate what has finished")
    p.set_defaults(func=_study)


def _study(a) -> int:
    from pathlib import Path

    from beit.experiments.study import load_study, run_study

    study = load_study(a.study, a.overrides)
    if a.fractions and not set(a.fractions) <= set(study.fractions):
        raise ConfigError(f"--fractions {a.fractions}: the study has {sorted(study.fractions)}")
    run_study(study, Path(a.out or f"runs/study_{Path(a.study).stem}"), a.fractions, a.report_only)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors reported as one line: bad input, and training stopped by a non-finite loss or a failed write."""
    from beit.tokenizers import TokenizerError
    from beit.train.checkpoint import CheckpointWriteError, RunDirError
    from beit.train.loop import NonFiniteLossError

    return (ConfigError, RunDirError, TokenizerError, CheckpointWriteError, NonFiniteLossError, FileNotFoundError,
            FileExistsError, KeyError, ValueError)


def _one_line(e: BaseException) -> str:
    """A user error's message. One raised in a DataLoader worker arrives with the worker's traceback appended
    ("Caught X in DataLoader worker process N.\nOriginal Traceback ..."): its last line is the error itself."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]  # "beit.data.datasets.BadFileError: cannot decode ..."
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.replace(".", "").replace("_", "").isalnum() else last
    return text


def _release_run_locks():
    """The command is over: its run directories are free for the next one (also when main() is called again in
    this process). Nothing to release if no run directory was opened (checkpoint handling never imported)."""
    if "beit.train.checkpoint" in sys.modules:
        sys.modules["beit.train.checkpoint"].release_run_locks()


def _resume_line(argv: list[str]) -> str:
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    return "beit " + " ".join(args) + " --resume"


def main(argv: list[str] | None = None):
    parser = build_parser()
    # argparse stops taking positionals after an option (`cfg.yaml --overwrite optim.lr=1`), so dotted
    # overrides that follow an option arrive as "unknown" arguments: give them back to `overrides`.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        result = args.func(args)
    except Exception as e:
        _release_run_locks()
        if type(e).__name__ == "Preempted":  # beit.train.loop.Preempted (not imported here: --help stays light)
            argv = sys.argv[1:] if argv is None else argv
            again = _resume_line(argv) if hasattr(args, "resume") else "beit " + " ".join(argv)  # drivers resume
            print(f"beit {args.command}: {e}. Resume with: {again}", file=sys.stderr)
            sys.exit(e.exit_code)
        if not isinstance(e, _user_errors()):
            raise
        if os.environ.get("BEIT_DEBUG"):
            raise
        # Bad input is reported as one clear line (BEIT_DEBUG=1 shows the traceback).
        print(f"beit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    _release_run_locks()
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    main()
