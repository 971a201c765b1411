"""Atomic writes: files via temp file + rename, output folders staged beside their destination and swapped in whole."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ptq.errors import PtqError


class OutputError(PtqError, RuntimeError):
    """The output location cannot be used; the message says how to fix it."""


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temporary path beside `target`; on success it is renamed onto `target`, on failure removed."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty folder unless `overwrite`; fail early if the parent is not writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the parent folder of --out {out}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"--out {out}: folder {parent} is not writable; choose a writable location")
    return out


@contextmanager
def staged_dir(out: str | Path, overwrite: bool = False):
    """Yield a hidden staging folder beside `out`; on success it replaces `out` whole, on any failure it is removed.

    An interrupted run therefore never leaves a half-written `out`, and an existing `out` is only replaced when
    `overwrite` is set and the new output is complete.
    """
    out = check_output_dir(out, overwrite)
    stage = out.parent / f".{out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)  # left by a run that was killed before it could clean up
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old"
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)
