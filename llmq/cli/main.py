"""``llmq`` entry point: builds the subcommand parsers and dispatches."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
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


# commands that write an output folder (atomically: an interrupted run leaves it as it was)
WRITERS = ("quantize", "export")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs (``finally``
    blocks remove temporary output folders)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _quiet_finalizers_of_interrupted_objects() -> None:
    """Silence errors raised by finalizers from here to the end of the process.

    A signal lands between any two bytecodes, so it can land inside a constructor: a progress bar
    interrupted in ``tqdm.__init__`` lacks attributes that its ``__del__`` reads, and Python prints
    "Exception ignored in ... AttributeError" when it is collected, after the one line that already
    reported the interrupt. Such a failure is a consequence of the interrupt, not a new error; the
    process is about to exit.
    """
    sys.unraisablehook = lambda unraisable: None


def _interrupted(args: argparse.Namespace, e: KeyboardInterrupt) -> int:
    _quiet_finalizers_of_interrupted_objects()
    name, code = ("SIGTERM", 128 + signal.SIGTERM) if isinstance(e, Terminated) else ("SIGINT", 128 + signal.SIGINT)
    what = f"llmq {args.command}: interrupted by {name}"
    if args.command in WRITERS:
        what += f"; nothing was written ({args.out} is as it was)"
    # a progress bar may have left the cursor mid-line
    print(f"\n{what}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, UnicodeDecodeError) as e:
        # expected user errors: one clear line, no traceback
        print(f"llmq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _interrupted(args, e)
    except BrokenPipeError:
        # the reader went away (`llmq inspect DIR | head`): stop quietly, as Unix tools do; point stdout
        # at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
