"""What every stage entry point shares: argument parsing, logging set-up, friendly failures."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pipeline.config import DEFAULT_PARAMS, ParamsError
from pipeline.io import BusyError


def stage_parser(stage: str, description: str, variant: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    if variant:
        parser.add_argument("variant", help="variant name, a key of train.variants in params.yaml")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    return parser


def run_stage(body: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
              argv: Sequence[str] | None = None) -> None:
    """Parse arguments and run ``body``; input errors (bad params, a missing file, a server that
    does not answer) exit 2 with one clear line, the traceback only with ``--debug``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = parser.parse_args(argv)
    try:
        body(args)
    except INPUT_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        fail(parser.prog, err)


# What a user can fix from the message alone; anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ParamsError, FileNotFoundError, ValueError, ConnectionError, BusyError)


def fail(prog: str, err: BaseException) -> None:
    """End a CLI on an input error: one line on stderr, exit status 2."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None
