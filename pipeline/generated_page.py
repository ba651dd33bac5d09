"""The command line of a page generated from the code (docs/parameters.md, docs/benchmarks.md):
write it, or with ``--check`` exit 1 when the committed copy is not what the code renders now."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def main(prog: str, description: str, page: Path, render: Callable[[], str], argv: list[str] | None = None) -> int:
    name = page.relative_to(page.parent.parent)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {name} is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not page.is_file() or page.read_text() != text:
            print(f"{name} is stale: run {prog}", file=sys.stderr)
            return 1
        return 0
    page.write_text(text)
    print(f"wrote {name}")
    return 0
