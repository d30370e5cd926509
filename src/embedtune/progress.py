"""Progress lines on stderr, one format for every step: `embedtune <step>: <message>`.

stdout carries only a step's JSON result (the CLI prints it), so everything a person reads goes to stderr.
Under torchrun every rank runs the same code: `say` prints from rank 0 only, so a line appears once.
User errors use the same shape, `embedtune <step>: error: <message>` (`error_line`); the launcher picks them
out of its children's output by that prefix. Credentials in URIs are masked (`safety.mask_credentials`).
"""

from __future__ import annotations

import os
import sys

from embedtune.safety import mask_credentials


def rank() -> int:
    """This process's global rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0"))


def say(step: str, message: str, all_ranks: bool = False) -> None:
    """Print `embedtune <step>: <message>` to stderr (rank 0 only unless `all_ranks`)."""
    if all_ranks or rank() == 0:
        print(mask_credentials(f"embedtune {step}: {message}"), file=sys.stderr, flush=True)


def error_line(step: str, message: str = "") -> str:
    """`embedtune <step>: error: <message>`; with no message, the prefix the launcher looks for."""
    return (
        mask_credentials(f"embedtune {step}: error: {message}".rstrip())
        if message
        else f"embedtune {step}: error:"
    )
