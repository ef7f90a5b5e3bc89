"""``llmq`` entry point: builds the subcommand parsers and dispatches."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Subcommand modules, in --help order; each defines register(subparsers) setting func=run.
SUBCOMMANDS = ("quantize", "generate", "eval", "inspect", "export", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmq",
        description="Quantize Hugging Face LLMs to low-bit weights, run and evaluate them.",
        epilog="Run `llmq <command> --help` for the options of each command. "
        "The embedded default model is called 'smollm2-135m'.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and other details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"llmq.cli.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        # expected user errors: one clear line, no traceback
        print(f"llmq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`llmq inspect DIR | head`): stop quietly, as Unix tools do; point stdout
        # at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
