"""The on-disk cache of latency measurements: one JSON file per key, written atomically.

A key says everything a measurement depends on (engine, engine version, CPU, thread count, the layer
configuration and its width grid). An entry is used only if it parses, was written for exactly the key
asked for, its checksum matches and its value validates; anything else is measured again and
overwritten, never trusted. Files are written to a temporary name in the same folder and renamed over
the entry, so a reader sees the old entry or the new one, never half of one.

The folder is ``$FXPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxprune``, else ``~/.cache/fxprune``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

logger = logging.getLogger("fxprune")
FORMAT = "fxprune-latency-cache/1"
T = TypeVar("T")


def default_cache_dir() -> Path:
    if os.environ.get("FXPRUNE_CACHE_DIR"):
        return Path(os.environ["FXPRUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fxprune"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _checksum(key: Any, value: Any) -> str:
    return hashlib.sha256((_canonical(key) + "\n" + _canonical(value)).encode()).hexdigest()


@dataclass
class LatencyCache:
    """Measurements on disk (``directory``), or in memory only when ``directory`` is None."""

    directory: Path | None = field(default_factory=default_cache_dir)
    remeasure: bool = False  # measure every entry again (and overwrite it) instead of reading the disk
    hits: int = 0
    measured: int = 0
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # entries re-measured, and why

    def __post_init__(self) -> None:
        self.directory = Path(self.directory) if self.directory is not None else None
        self._memory: dict[str, Any] = {}

    def path(self, key: dict) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256(_canonical(key).encode()).hexdigest()
        return self.directory / "latency" / key.get("kind", "entry") / f"{digest}.json"

    def get_or_measure(self, key: dict, measure: Callable[[], Any], parse: Callable[[Any], T]) -> T:
        """The cached value for ``key`` parsed by ``parse``; else ``measure()``, stored, then parsed."""
        found = self.lookup(key, parse)
        return found if found is not None else self.store(key, measure(), parse)

    def lookup(self, key: dict, parse: Callable[[Any], T]) -> T | None:
        """The cached value for ``key`` parsed by ``parse``, or None if there is no valid entry."""
        digest = _canonical(key)
        found = self._memory.get(digest)
        if found is None and not self.remeasure:
            found = self._read(key, parse)
        if found is not None:
            self.hits += 1
            self._memory[digest] = found
        return found

    def store(self, key: dict, value: Any, parse: Callable[[Any], T]) -> T:
        """Validate ``value`` with ``parse`` (a measurement that does not is a bug: it raises), then store it."""
        parsed = parse(value)
        self.measured += 1
        self._write(key, value)
        self._memory[_canonical(key)] = parsed
        return parsed

    def info(self) -> dict[str, dict[str, float]]:
        """Per kind of entry (layer tables, whole-model timings, exported graphs): entries and bytes on disk."""
        found: dict[str, dict[str, float]] = {}
        for path in self._files():
            entry = found.setdefault(path.parent.name, {"entries": 0, "bytes": 0, "newest": 0.0})
            stat = path.stat()
            entry["entries"] += 1
            entry["bytes"] += stat.st_size
            entry["newest"] = max(entry["newest"], stat.st_mtime)
        return found

    def clear(self, kind: str | None = None) -> int:
        """Delete the entries on disk (of one kind, or all); returns how many went."""
        removed = 0
        for path in self._files(kind or "*"):
            with suppress(OSError):
                path.unlink()
                removed += 1
        self._memory.clear()
        return removed

    def _files(self, kind: str = "*") -> list[Path]:
        """The entry files on disk (of one kind), where ``path`` puts them."""
        root = self.directory / "latency" if self.directory is not None else None
        return sorted(root.glob(f"{kind}/*.json")) if root is not None and root.exists() else []

    def _read(self, key: dict, parse: Callable[[Any], T]) -> T | None:
        path = self.path(key)
        if path is None or not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            if not isinstance(entry, dict) or entry.get("format") != FORMAT:
                self._reject(path, "not an fxprune latency entry of this format")
                return None
            if entry.get("key") != json.loads(_canonical(key)):
                self._reject(path, "written for another key (another engine, machine or layer)")
                return None
            if entry.get("checksum") != _checksum(entry["key"], entry.get("value")):
                self._reject(path, "checksum mismatch (the file was altered or truncated)")
                return None
            return parse(entry["value"])
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            self._reject(path, f"unreadable ({type(err).__name__}: {err})")
            return None

    def _reject(self, path: Path, why: str) -> None:
        self.rejected.append((path, why))
        logger.warning("fxprune: latency cache entry %s is %s; measuring it again", path, why)
        return None

    def _write(self, key: dict, value: Any) -> None:
        path = self.path(key)
        if path is None:
            return
        text = json.dumps({"format": FORMAT, "key": key, "value": value, "checksum": _checksum(key, value)},
                          sort_keys=True, allow_nan=False)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, text)
        except OSError as err:  # a read-only or full disk costs a re-measurement next time, not the compile
            logger.warning("fxprune: could not write latency cache entry %s (%s); continuing without it", path, err)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
