"""Writing a command's output directory without ever deleting what a user keeps there.

`build` and `export --out` replace only a directory they wrote before (it holds their marker file) or
an empty one, and write beside it first, moving into place once complete: a failed or interrupted
write leaves the earlier output as it was.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def check_replaceable(out_dir: Path, marker: str, writer: str) -> None:
    """ValueError unless ``out_dir`` is new, an empty directory, or one holding ``marker``."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).is_file())):
        raise ValueError(f"refusing to replace {out_dir}: it is not a directory {writer} wrote (no {marker}); "
                         "choose a new or empty directory")


def write_replacing(out_dir: Path, marker: str, writer: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a fresh directory beside ``out_dir``, then move it into place (after
    `check_replaceable`); ``write`` must leave ``marker`` in it. Returns ``out_dir`` (absolute)."""
    out_dir = Path(out_dir).absolute()
    check_replaceable(out_dir, marker, writer)
    building = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(building)
        if not (building / marker).is_file():
            raise RuntimeError(f"{writer} wrote no {marker}")
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    building.rename(out_dir)
    return out_dir
