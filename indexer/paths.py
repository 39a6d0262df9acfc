"""Confine user-supplied paths to a data root, so that no request reads outside it."""

from __future__ import annotations

import os
from pathlib import Path

from attribution.files import atomic_write
from indexer.errors import IndexerError


def confine(path: str | os.PathLike[str], root: Path | None, *, base: Path | None = None,
            what: str = "path") -> Path:
    """Resolve ``path`` (relative to ``base``, following symlinks) and require it under ``root``.

    With ``root=None`` the path is only resolved. A ``..`` escape or a symlink pointing out of
    the root raises :class:`IndexerError` naming the path and the root.
    """
    raw = Path(os.fspath(path)).expanduser()
    if "\x00" in str(raw):
        raise IndexerError(f"{what} {str(raw)!r} contains a NUL byte")
    if not raw.is_absolute():
        raw = (base if base is not None else Path.cwd()) / raw
    resolved = raw.resolve(strict=False)
    if root is None:
        return resolved
    root_resolved = Path(root).expanduser().resolve(strict=False)
    if not resolved.is_relative_to(root_resolved):
        raise IndexerError(
            f"{what} {path} resolves to {resolved}, outside the data root {root_resolved}; "
            "put the file under the data root (symlinks out of it are not followed)"
        )
    return resolved


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and ``os.replace``."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (renames) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
