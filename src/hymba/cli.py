"""The `hymba` command. Each subcommand lives in the module that does the work and registers itself here.

A subcommand module exposes `add_parser(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed args. Modules import their heavy dependencies inside `func`, so `hymba --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from hymba.errors import HymbaError

SUBCOMMANDS = [
    "hymba.generate_cli",  # generate, chat
    "hymba.bench",  # bench
    "hymba.train.data_cli",  # data
    "hymba.train.trainer",  # train
    "hymba.study.run",  # study
    "hymba.eval.cli",  # eval
    "hymba.serve.cli",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hymba",
        description="Run, evaluate, train and study Hymba hybrid-head language models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Start-up work the library reports (compiling and capturing decode steps) shows on stderr.
    import logging

    reporter = logging.StreamHandler(sys.stderr)
    reporter.setFormatter(logging.Formatter(f"hymba {args.command}: %(message)s"))
    logging.getLogger("hymba").addHandler(reporter)
    logging.getLogger("hymba").setLevel(logging.INFO)
    try:
        if getattr(args, "device", None) not in (None, "auto"):  # every subcommand's --device, checked in one place
            from hymba.checkpoint import resolve_device

            resolve_device(args.device)
        result = args.func(args)
    except HymbaError as exc:
        print(f"hymba {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hymba {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`hymba generate ... | head -c 20`): stop quietly with the status a SIGPIPE gives, as
        # `yes | head` does. stdout goes to /dev/null first, or Python reports the pipe again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
