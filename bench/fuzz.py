"""A long fuzz run of convert and split: the property tests of `tests/test_hostile_input.py`, more examples.

    .venv/bin/python bench/fuzz.py                  # 2,000 examples per fuzz test
    .venv/bin/python bench/fuzz.py --examples 20000 --seed 7

`make test` runs each fuzz test with 60 examples (seconds); this runs the same properties (random JSON values,
random bytes in every file kind, random row shapes, deep nesting; convert writes exactly the valid rows and
accounts for every line, or exits 2 with a located message; split copies every line to one side or exits 2;
never a traceback, never a partial file) with as many examples as asked, and prints examples per second.
A failure prints hypothesis' smallest failing input; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="examples per fuzz test")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = ap.parse_args()
    env = {**os.environ, "EMBEDTUNE_FUZZ_EXAMPLES": str(args.examples), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_hostile_input.py",
        "-k",
        "fuzz",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    if args.seed is not None:
        cmd.append(f"--hypothesis-seed={args.seed}")
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    seconds = time.perf_counter() - t0
    n_tests = 4  # the fuzz tests of tests/test_hostile_input.py (convert x 3, split x 1)
    print(
        f"\n{n_tests} fuzz tests x {args.examples} examples in {seconds:.0f} s "
        f"({n_tests * args.examples / seconds:.0f} examples/s on {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}); {'no failure' if rc == 0 else 'FAILED'}"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
