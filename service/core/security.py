"""API keys: random tokens, stored only as sha256 hashes, each with a tenant and scopes.

Scopes: ``read`` (list, inspect, top-k, results), ``submit`` (jobs), ``admin`` (register,
upload and delete models, corpora and indexes). A key sees only its own tenant's resources.

Keys live in ``{data_dir}/keys.json`` (mode 0600): ``{sha256: {tenant, scopes, name, created}}``.
A key is shown once, when created; a lost key is revoked and replaced, never recovered.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("read", "submit", "admin")
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_PREFIX = "tda_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's tenant, scopes and a non-secret key id (for limits, logs)."""

    tenant: str
    scopes: frozenset[str]
    key_id: str
    name: str = ""


def hash_key(key: str) -> str:
    """The stored form of a key (keys are 256-bit random, so one sha256 suffices)."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(
            f"tenant {tenant!r} must be 1–63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return tenant


class KeyStore:
    """The key file, re-read when it changes on disk (so `tda keys create` needs no restart).

    A known key is re-checked against the file at most every ``recheck_seconds`` (a revoked
    key stops working within that time); an unknown key always looks at the file again, so a
    key created a moment ago by another process works at once.
    """

    def __init__(self, path: Path, recheck_seconds: float = 1.0):
        self.path = path
        self.recheck = recheck_seconds
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._checked = -float("inf")
        self._keys: dict[str, dict] = {}

    def _load(self, fresh: bool = True) -> dict[str, dict]:
        now = time.monotonic()
        if not fresh and now - self._checked < self.recheck:
            return self._keys  # no stat on the hot path: each one can wait for the GIL
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._keys, self._mtime = {}, None
            return self._keys
        if mtime != self._mtime:
            self._keys = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            self._mtime = mtime
        return self._keys

    def authenticate(self, key: str) -> Principal | None:
        """The principal for a presented key, or None.

        Looked up by the key's hash: timing reveals nothing about stored keys, since an
        attacker cannot choose inputs whose hashes approach a stored one.
        """
        digest = hash_key(key)
        with self._lock:
            entry = self._load(fresh=False).get(digest)
            if entry is None:
                entry = self._load().get(digest)
        if entry is None:
            return None
        return Principal(entry["tenant"], frozenset(entry["scopes"]), digest[:12],
                         entry.get("name", ""))

    def create(self, tenant: str, scopes: list[str] | tuple[str, ...], name: str = "") -> str:
        """Make a key, store its hash, and return the key (the only time it is visible)."""
        check_tenant(tenant)
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, got {list(scopes)}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        entry = {"tenant": tenant, "scopes": sorted(set(scopes)), "name": name,
                 "created": time.time()}
        with self._lock:
            keys = dict(self._load())
            keys[hash_key(key)] = entry
            self._write(keys)
        return key

    def revoke(self, key_id: str) -> bool:
        """Remove the key whose id (hash prefix) is ``key_id``."""
        with self._lock:
            keys = dict(self._load())
            matches = [h for h in keys if h.startswith(key_id)]
            if len(matches) != 1:
                return False
            del keys[matches[0]]
            self._write(keys)
        return True

    def list(self) -> list[dict]:
        """Key ids with tenant, scopes and name (never the keys)."""
        with self._lock:
            keys = self._load()
        return [{"key_id": h[:12], **entry} for h, entry in sorted(keys.items())]

    def _write(self, keys: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(keys, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self._mtime = None  # re-read on next use


def key_file(data_dir: Path) -> Path:
    return data_dir / "keys.json"


def ensure_bootstrap_key(data_dir: Path, tenant: str = "default") -> tuple[str, bool]:
    """The all-scopes key saved in ``{data_dir}/api-key`` (mode 0600), created if needed.

    Returns ``(key, created)``; `tda serve` (embedded) and `tda demo` use it, clients read the
    file when ``TDA_API_KEY`` is unset.
    """
    store = KeyStore(key_file(data_dir))
    path = data_dir / "api-key"
    if path.is_file():
        key = path.read_text().strip()
        if store.authenticate(key) is not None:
            return key, False
    key = store.create(tenant, SCOPES, name="bootstrap")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key, True
