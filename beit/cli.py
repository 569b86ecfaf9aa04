"""`beit` command line. Each sub-command is a thin shell over a library function."""

from __future__ import annotations

import argparse
import os
import sys

from beit.config import ConfigError, load_config


def add_train_command(sub, name: str, help: str, run):
    """`beit NAME CONFIG [key=value ...] [--resume | --overwrite]` calling `run(cfg, resume=, overwrite=)`."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue the run in its run directory, exactly")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.set_defaults(func=lambda a: run(load_config(a.config, a.overrides), resume=a.resume, overwrite=a.overwrite))
    return p


def _pretrain(cfg, **kw):
    from beit.train.pretrain import run_pretrain

    return run_pretrain(cfg, **kw)


def build_parser() -> argparse.ArgumentParser:
    from beit.convert.cli import register as register_convert
    from beit.data_cli import register as register_data
    from beit.reproduce import register as register_reproduce
    from beit.tokenizers.cli import register as register_tokenizer
    from beit.train.eval_cli import register as register_eval
    from beit.visualize import register as register_predict

    parser = argparse.ArgumentParser(prog="beit", description="BEiT: BERT pre-training of image transformers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_command(sub, "pretrain", "masked image modeling pretraining (BEiT)", _pretrain)
    register_eval(sub)
    register_predict(sub)
    register_tokenizer(sub)
    register_convert(sub)
    register_data(sub)
    register_reproduce(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from beit.tokenizers import TokenizerError
    from beit.train.checkpoint import RunDirError

    return ConfigError, RunDirError, TokenizerError, FileNotFoundError, FileExistsError, KeyError, ValueError


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
    except _user_errors() as e:
        if os.environ.get("BEIT_DEBUG"):
            raise
        # Bad input is reported as one clear line (BEIT_DEBUG=1 shows the traceback).
        print(f"beit {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    main()
