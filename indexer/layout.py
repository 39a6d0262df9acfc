"""Where an index lives on disk and how versions are published.

```
<root>/<name>/
  current               text file with the served version (replaced atomically)
  versions/v0001/       one immutable directory per published version
  staging/<plan>/       an unfinished build: raw shards kept for resume, then the version files
  .lock                 serialises publishing and updates of this index
```
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from indexer.errors import IndexCorruptError, IndexerError, IndexMismatchError, IndexNotFoundError
from indexer.paths import atomic_write_text, fsync_dir

FORMAT = "tdaserve-index/1"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^v(\d{4,})$")


def check_name(name: str) -> str:
    """An index name: letters, digits, ``._-``, at most 64 characters, no path tricks."""
    if not _NAME.match(name or "") or ".." in name:
        raise IndexerError(
            f"index name {name!r} is not allowed; use letters, digits, '.', '_' and '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )
    return name


def index_dir(root: Path, name: str) -> Path:
    return Path(root) / check_name(name)


def read_current(directory: Path) -> str | None:
    """The version name ``current`` points at, or None before the first publish."""
    pointer = directory / "current"
    if not pointer.is_file():
        return None
    version = pointer.read_text(encoding="utf-8").strip()
    if not _VERSION.match(version):
        raise IndexCorruptError(f"{pointer} holds {version!r}, not a version name like v0001")
    return version


def write_current(directory: Path, version: str) -> None:
    """Point ``current`` at ``version`` atomically (write a temporary file, then os.replace)."""
    atomic_write_text(directory / "current", version + "\n")


def versions(directory: Path) -> list[str]:
    """Published versions, oldest first."""
    base = directory / "versions"
    if not base.is_dir():
        return []
    found = [p.name for p in base.iterdir() if _VERSION.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda v: int(v[1:]))


def publish(directory: Path, built: Path) -> str:
    """Move a finished version directory into ``versions/`` under the next free name.

    Call while holding :func:`locked`. The rename is atomic: readers see the whole version or
    none of it. Returns the new version name (``current`` is not changed here).
    """
    base = directory / "versions"
    base.mkdir(parents=True, exist_ok=True)
    existing = versions(directory)
    version = f"v{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
    manifest_path = built / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["version"] = version
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
    os.rename(built, base / version)
    fsync_dir(base)
    return version


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on one index (publishing, adds and deletes)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_version(path_or_name: str | Path, root: Path | None, version: str | None = None) -> Path:
    """The directory of one published version, from a version path, an index path or a name."""
    candidate = Path(path_or_name)
    if (candidate / MANIFEST).is_file() and version is None:
        return candidate
    if not (candidate / "versions").is_dir() and not (candidate / "current").exists():
        if root is None:
            raise IndexNotFoundError(
                f"no index at {candidate}; give the path of an index directory or a name and root"
            )
        name = str(path_or_name)
        if "@" in name and version is None:
            name, version = name.split("@", 1)
        candidate = index_dir(root, name)
        if not candidate.is_dir():
            raise IndexNotFoundError(f"there is no index named {name!r} under {root}; build it first")
    if version is None:
        version = read_current(candidate)
        if version is None:
            raise IndexNotFoundError(
                f"index {candidate.name!r} has no published version yet (no 'current' pointer); "
                "a build may still be running or may have been interrupted — rerun it to resume"
            )
    if not _VERSION.match(version):
        raise IndexerError(f"version {version!r} is not a version name like v0001")
    directory = candidate / "versions" / version
    if not directory.is_dir():
        raise IndexNotFoundError(f"index {candidate.name!r} has no version {version}")
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and check a version's manifest against the directory it sits in."""
    path = directory / MANIFEST
    if not path.is_file():
        raise IndexCorruptError(f"{path} is missing; {directory} is not a complete index version — rebuild the index")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexCorruptError(f"{path} is not valid JSON ({err}); rebuild the index") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexCorruptError(
            f"{path} is not a tdaserve index manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"expected {FORMAT!r})"
        )
    expected_version = directory.name
    if _VERSION.match(expected_version) and manifest.get("version") != expected_version:
        raise IndexMismatchError(
            f"{path} describes {manifest.get('name')}@{manifest.get('version')}, but sits in "
            f"{directory}; the manifest was copied from another index version — rebuild it"
        )
    parent = directory.parent.parent.name if directory.parent.name == "versions" else None
    if parent is not None and manifest.get("name") != parent:
        raise IndexMismatchError(
            f"{path} belongs to index {manifest.get('name')!r}, not {parent!r}; the manifest "
            "was copied from another index — rebuild it"
        )
    for key in ("dim", "dtype", "shards", "counts", "method", "model", "faiss"):
        if key not in manifest:
            raise IndexCorruptError(f"{path} lacks {key!r}; rebuild the index")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
