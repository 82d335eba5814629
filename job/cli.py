"""What the command lines share: one-line errors and warnings, printed once per job (by global rank 0)."""

import os
import sys


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), cut to limit."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def _is_rank_zero() -> bool:
    # from the launcher's environment, so that it works before (and after) the process group exists
    return int(os.environ.get("RANK", 0)) == 0


def info(message: str) -> None:
    """A line on stdout from global rank 0."""
    if _is_rank_zero():
        print(message, flush=True)


def error(message: str) -> None:
    """`error: message` on stderr from global rank 0 (every rank hits the same config or data mistake)."""
    if _is_rank_zero():
        print(f"error: {message}", file=sys.stderr, flush=True)


def warning(message: str) -> None:
    """`warning: message` on stderr from global rank 0."""
    if _is_rank_zero():
        print(f"warning: {message}", file=sys.stderr, flush=True)
