"""Writing a command's output directory without ever deleting what a user keeps there.

`build` and `export --out` replace only a directory they wrote before (it holds their marker file) or
an empty one, and write beside it first, swapping it into place once complete: a failed or
interrupted write leaves the earlier output as it was.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

EXPORT_MARKER = ".dspark-export"  # in every directory `export --out` writes: the one kind it replaces


def check_replaceable(out_dir: Path, marker: str, writer: str) -> None:
    """ValueError unless ``out_dir`` is new, an empty directory, or one holding ``marker``."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).is_file())):
        raise ValueError(f"refusing to replace {out_dir}: it is not a directory {writer} wrote (no {marker}); "
                         "choose a new or empty directory")


def _pid_alive(name: str) -> bool:
    pid = name.rsplit("-", 1)[-1]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def write_replacing(out_dir: Path, marker: str, writer: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a fresh directory beside ``out_dir``, then swap it into place (after
    `check_replaceable`); ``write`` must leave ``marker`` in it. ``out_dir`` is resolved first (a link
    to a directory replaces what it points to). Returns the resolved directory."""
    out_dir = Path(out_dir).resolve()
    check_replaceable(out_dir, marker, writer)
    for kind in ("building", "old"):  # left by a write that was killed
        for stale in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            if stale.is_dir() and not _pid_alive(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(out_dir.parent, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise ValueError(f"cannot write beside {out_dir}: {writer} builds its output next to it and moves it into "
                         "place; choose a directory whose parent is writable")
    building = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"  # ``write`` creates it
    shutil.rmtree(building, ignore_errors=True)
    try:
        write(building)
        if not (building / marker).is_file():
            raise RuntimeError(f"{writer} wrote no {marker}")
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)  # out_dir is always whole: the earlier output until the new one is in place
    building.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
