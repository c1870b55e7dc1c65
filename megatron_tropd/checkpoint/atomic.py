"""Durable writes and the atomic publish of a directory: write into a temporary sibling, fsync, rename.

A directory published this way is complete or absent: its contents are written under another name in the
same parent (the same file system, so the final ``rename`` is atomic), and readers only ever see the old
directory or the whole new one. The rename reaches the disk only after the files it publishes
(``fsync_files``, for writers that do not sync themselves) and is made durable by syncing the parent.
Used by checkpoint saves and by HF conversion (``megatron_tropd.hf.convert``). Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and sync it to disk before returning."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_files(directory: Path) -> None:
    """Sync every regular file under ``directory``, then every directory in it (deepest first), so that
    a crash after the publishing rename cannot leave a published file empty or a name missing."""
    directories = [directory]
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            directories.append(path)
        elif path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in reversed(directories):
        fsync_dir(path)


def publish_directory(staging: Path, final: Path, aside: Path | None = None) -> Path | None:
    """Rename the complete ``staging`` to its sibling ``final`` and make the rename durable.

    Without ``aside`` an existing ``final`` makes the rename fail. With it, an existing ``final`` is first
    renamed to ``aside`` and returned: the caller deletes it once nothing names it any more (until then a
    crash leaves both the old and the new directory on disk, never neither). Returns None otherwise.
    """
    displaced = None
    if aside is not None and final.exists():
        final.rename(aside)
        displaced = aside
    staging.rename(final)
    fsync_dir(final.parent)
    return displaced
