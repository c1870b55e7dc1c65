"""File manifests of checkpoint directories: every file's size and content hash, recorded at save, checked
at load.

A checkpoint's shards are read by ``torch.load`` / dist-checkpointing, which check neither lengths nor
contents: a shard with damaged bytes loads as other numbers (the run goes NaN a step later and saves NaN
checkpoints), and a truncated or missing one fails deep inside a reader with no file named. The manifest
(``{relative path: [size, xxh3-128 hex]}``) is written into the checkpoint's metadata after every shard is
on disk, and the same walk at load names each file that is missing, of another size, or of other contents.

XXH3-128 reads at memory bandwidth (several GB/s per core), so hashing costs about as much as reading the
files once; the work is split over ranks by file (``share``), each hashing ``names[rank::world]``.
Torch-free: the collective wrappers live in ``checkpoint.manifest``.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

HASH_NAME = "xxh3_128"
_CHUNK_BYTES = 8 << 20

Manifest = dict[str, list]
"""Relative path (POSIX separators) -> ``[size in bytes, hex digest]``."""


def list_files(directory: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every regular file under ``directory`` as a sorted relative POSIX path, minus ``exclude`` names."""
    names = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and relative not in exclude:
            names.append(relative)
    return sorted(names)


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files rank ``rank`` of ``world_size`` hashes: every ``world_size``-th one."""
    return names[rank::world_size]


def file_digest(path: Path) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def hash_files(directory: Path, names: list[str]) -> Manifest:
    """The manifest entries of ``names`` (relative to ``directory``)."""
    return {name: [os.path.getsize(directory / name), file_digest(directory / name)] for name in names}


def check_files(directory: Path, manifest: Manifest, names: list[str]) -> list[str]:
    """Problems of the recorded files ``names``: one line per missing, resized or altered file.

    The size is compared before hashing, so a truncated shard is reported without reading it.
    """
    problems = []
    for name in names:
        path = directory / name
        size, digest = manifest[name]
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (actual := os.path.getsize(path)) != size:
            problems.append(f"{name}: {actual} bytes, recorded {size} (truncated or overwritten)")
        elif file_digest(path) != digest:
            problems.append(f"{name}: contents differ from the recorded {HASH_NAME} hash (damaged bytes)")
    return problems
