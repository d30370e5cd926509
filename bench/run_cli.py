"""The benchmarks' way to run one `embedtune` CLI command (the installed console script, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def embedtune(*args: str) -> dict:
    """Run `embedtune ARGS...`; return the JSON result it prints, or exit naming the command and its stderr."""
    cmd = [str(REPO / ".venv" / "bin" / "embedtune"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") :])
