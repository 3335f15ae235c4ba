"""The ``zimage-trt`` command: one argparse app, one module per command group, each parsing its
arguments, calling the service (``zimage_trt.runtime``, ``build_engines``, ``bench``) and
printing what it returns."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from zimage_trt import __version__
from zimage_trt.cli import (
    bench,
    calibrate,
    engines,
    generate,
    models,
    plan,
    serve,
    sigmas,
    workflow,
)
from zimage_trt.cli.common import RAW, examples
from zimage_trt.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    InputError,
    NonFiniteError,
    ZimageError,
    os_error,
)

EXIT_CODES = """exit codes:
  0    done
  1    a bug in zimage-trt (rerun with --debug and report the traceback)
  2    bad input: an argument, workflow, graph, prompts file or request out of range
  3    a file is missing, unreadable or damaged: weights, LoRA, engine folder, image
  4    not available here: backend, library or device (the message names what runs instead)
  5    an output cannot be written: permissions, a full disk, a refused name
  6    the run failed: NaN/Inf values, an engine or build step that failed
  130  interrupted (Ctrl-C): nothing half-written is left; finished engines stay for reuse"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-trt",
        formatter_class=RAW,
        description="Compiled inference for Z-Image-Turbo with ComfyUI-identical sampling.",
        epilog=examples(
            "zimage-trt workflow show zimage-121101",
            "zimage-trt workflow import my_graph.json -o my_workflow.yaml",
            "zimage-trt sigmas --scheduler beta --shift 7 --steps 16 --denoise 0.6",
        )
        + "\n\n"
        + EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"zimage-trt {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the Python traceback as well as the one-line message",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sigmas.add_parser(sub)
    workflow.add_parser(sub)
    generate.add_generate_parser(sub)
    engines.add_build_parser(sub)
    calibrate.add_parser(sub)
    plan.add_parser(sub)
    generate.add_reproduce_parser(sub)
    bench.add_bench_parser(sub)
    serve.add_serve_parser(sub)
    engines.add_inspect_parser(sub)
    models.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and an exit code (README "Errors and
    safety"), ``--debug`` adds the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\nzimage-trt: interrupted (nothing half-written was left)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        error = as_project_error(exc)
        print(f"zimage-trt: error: {error}", file=sys.stderr)
        if error.exit_code == EXIT_INTERNAL:
            print(
                "zimage-trt: this is a bug in zimage-trt; run the command again with --debug "
                "for the traceback and report it",
                file=sys.stderr,
            )
        return error.exit_code


def as_project_error(exc: Exception) -> ZimageError:
    """The project's error for whatever escaped a command: its own errors as they are, the
    built-in kinds the sampling math and libraries raise mapped to the matching exit code, and
    anything else an internal error (exit 1) with its type named."""
    if isinstance(exc, ZimageError):
        return exc
    if isinstance(exc, FloatingPointError):
        return NonFiniteError(str(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return os_error(exc)
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return InputError(str(exc))
    error = ZimageError(f"{type(exc).__name__}: {exc}")
    error.exit_code = EXIT_INTERNAL
    return error
