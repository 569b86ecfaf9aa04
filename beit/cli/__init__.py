"""`beit` command line: every command's argument parsing, and nothing else. Each sub-command is a thin shell
over a library function, which its module imports when the command runs, so `beit --help` loads no torch."""

from __future__ import annotations

import argparse
import os
import sys

from beit import __version__
from beit.cli import bench, convert, data, export, plot, reproduce, study, tokenizer, train
from beit.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit", description="BEiT: BERT pre-training of image transformers")
    parser.add_argument("--version", action="version", version=f"beit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (train, tokenizer, convert, data, export, plot, reproduce, study, bench):
        command.register(sub)
    return parser


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
