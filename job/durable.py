"""Files written so that a crash at any moment leaves either the old one or the new one, never a torn one."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def previous(path: Path) -> Path:
    """Where write_atomically(..., keep_previous=True) moves the file it replaces (last.pt -> last.prev.pt)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def write_atomically(path: Path, write: Callable[[BinaryIO], None], keep_previous: bool = False) -> None:
    """path gets what write(file) writes, so that a crash at any moment leaves either the old file or the new
    one (a temp file, fsync, rename, the directory fsynced); whatever write or the filesystem raised, re-raised
    once the temp file is gone.

    keep_previous moves the old file to previous(path) first: a fallback should the new one be unreadable.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous(path))
        os.replace(tmp, path)
        sync_dir(path.parent)
    except BaseException:  # not only OSError: torch.save raises RuntimeError on a full disk
        tmp.unlink(missing_ok=True)
        raise


def sync_dir(directory: Path) -> None:
    """fsync a directory: makes the renames in it durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
