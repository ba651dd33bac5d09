"""Each benchmark configuration runs in a fresh process, so its peak memory is its own and an
out-of-memory kill ends only that configuration; this runs one and reads its JSON result."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOES_NOT_FIT = "does not fit"


def run_child(cmd: Sequence[str], row: Mapping, env: Mapping[str, str] | None = None) -> dict:
    """The child's last stdout line as JSON; else ``row`` with status "does not fit" (killed or
    out of memory) or the child's last error line."""
    done = subprocess.run(list(cmd), check=False, capture_output=True, text=True, cwd=REPO,
                          env=dict(env) if env is not None else None)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode in (-9, 137) or "out of memory" in done.stderr.lower():
        return {**row, "status": DOES_NOT_FIT}
    return {**row, "status": "error: " + done.stderr.strip().splitlines()[-1]}
