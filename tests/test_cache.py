"""The latency cache: keyed by everything a measurement depends on, written atomically, never trusting a
bad entry."""

from __future__ import annotations

import json
import os

import pytest

from fxprune.cache import LatencyCache, atomic_write


def _key(**changes) -> dict:
    key = {"kind": "table", "engine": {"engine": "onnxruntime", "version": "1.31.1", "cpu": "Xeon", "threads": 2},
           "unit": {"op": "conv", "input_shape": [1, 64, 56, 56]}}
    for name, value in changes.items():
        if name in ("engine", "version", "cpu", "threads"):
            key["engine"] = {**key["engine"], name: value}
        else:
            key[name] = value
    return key


class Counter:
    """A measurement that counts how often it runs."""

    def __init__(self, value=None) -> None:
        self.calls = 0
        self.value = value if value is not None else {"ms": [1.0, 2.0]}

    def __call__(self):
        self.calls += 1
        return self.value


def _parse(value):
    if not isinstance(value["ms"], list) or not value["ms"]:
        raise ValueError("no latencies")
    return value["ms"]


def test_a_stored_entry_is_found_again_without_measuring(tmp_path):
    measure = Counter()
    assert LatencyCache(tmp_path).get_or_measure(_key(), measure, _parse) == [1.0, 2.0]
    fresh = LatencyCache(tmp_path)  # another process: nothing in memory
    assert fresh.get_or_measure(_key(), measure, _parse) == [1.0, 2.0]
    assert measure.calls == 1 and fresh.hits == 1 and fresh.measured == 0


@pytest.mark.parametrize("change", [dict(engine="torch"), dict(version="1.32.0"), dict(cpu="EPYC"),
                                    dict(threads=4), dict(unit={"op": "conv", "input_shape": [1, 64, 28, 28]})])
def test_every_part_of_the_key_separates_entries(tmp_path, change):
    cache = LatencyCache(tmp_path)
    cache.get_or_measure(_key(), Counter(), _parse)
    other = Counter({"ms": [5.0]})
    assert LatencyCache(tmp_path).get_or_measure(_key(**change), other, _parse) == [5.0]
    assert other.calls == 1
    assert cache.path(_key()) != cache.path(_key(**change))


def test_without_a_directory_the_cache_lives_in_memory(tmp_path):
    measure = Counter()
    cache = LatencyCache(None)
    cache.get_or_measure(_key(), measure, _parse)
    cache.get_or_measure(_key(), measure, _parse)
    assert measure.calls == 1 and cache.path(_key()) is None


def _stored(tmp_path):
    cache = LatencyCache(tmp_path)
    cache.get_or_measure(_key(), Counter(), _parse)
    return cache.path(_key())


@pytest.mark.parametrize("damage, why", [
    (lambda text: text[: len(text) // 2], "unreadable"),  # truncated by a crash or a full disk
    (lambda text: "not json at all", "unreadable"),
    (lambda text: text.replace("1.0", "9.0"), "checksum"),  # edited by hand
    (lambda text: json.dumps({**json.loads(text), "format": "someone-else/3"}), "format"),
    (lambda text: json.dumps({**json.loads(text), "value": {"ms": []}, "checksum": "x"}), "checksum"),
])
def test_a_corrupt_entry_is_measured_again_and_replaced(tmp_path, damage, why):
    path = _stored(tmp_path)
    path.write_text(damage(path.read_text()))
    cache = LatencyCache(tmp_path)
    measure = Counter({"ms": [3.0]})
    assert cache.get_or_measure(_key(), measure, _parse) == [3.0]
    assert measure.calls == 1
    assert len(cache.rejected) == 1 and why in cache.rejected[0][1]
    assert LatencyCache(tmp_path).get_or_measure(_key(), Counter({"ms": [7.0]}), _parse) == [3.0]  # repaired


def test_an_entry_written_for_another_key_is_not_trusted(tmp_path):
    """A file copied from another machine (or a hash collision) holds a valid entry for another key."""
    path = _stored(tmp_path)
    cache = LatencyCache(tmp_path)
    foreign_key = _key(cpu="EPYC")
    cache.path(foreign_key).parent.mkdir(parents=True, exist_ok=True)
    cache.path(foreign_key).write_text(path.read_text())
    measure = Counter({"ms": [4.0]})
    assert cache.get_or_measure(foreign_key, measure, _parse) == [4.0]
    assert measure.calls == 1 and "another key" in cache.rejected[0][1]


def test_a_value_that_does_not_validate_is_measured_again(tmp_path):
    cache = LatencyCache(tmp_path)
    cache.get_or_measure(_key(), Counter(), _parse)

    def strict(value):
        raise ValueError("a table of another shape")
    measure = Counter({"ms": [8.0]})
    fresh = LatencyCache(tmp_path)
    with pytest.raises(ValueError):  # the new measurement does not validate either: that is a bug, and it raises
        fresh.get_or_measure(_key(), measure, strict)
    assert measure.calls == 1 and "unreadable" in fresh.rejected[0][1]


def test_a_crash_while_writing_leaves_the_old_entry_and_no_stray_file(tmp_path, monkeypatch):
    path = _stored(tmp_path)
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk pulled out")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write(path, "{half a file")
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_an_unwritable_cache_costs_a_measurement_not_the_run(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    cache = LatencyCache(blocked)
    assert cache.get_or_measure(_key(), Counter(), _parse) == [1.0, 2.0]
    assert "could not write" in caplog.text


def test_info_counts_entries_by_kind_and_clear_removes_them(tmp_path):
    cache = LatencyCache(tmp_path)
    for index in range(3):
        cache.store({"kind": "table", "i": index}, [index], lambda v: v)
    cache.store({"kind": "plan", "i": 0}, [1.0], lambda v: v)
    info = cache.info()
    assert info["table"]["entries"] == 3 and info["plan"]["entries"] == 1 and info["table"]["bytes"] > 0
    assert cache.clear("plan") == 1 and set(cache.info()) == {"table"}
    assert cache.clear() == 3 and cache.info() == {}


def test_remeasure_measures_again_and_overwrites(tmp_path):
    LatencyCache(tmp_path).store({"kind": "table"}, [1.0], lambda v: v)
    assert LatencyCache(tmp_path).get_or_measure({"kind": "table"}, lambda: [2.0], lambda v: v) == [1.0]
    fresh = LatencyCache(tmp_path, remeasure=True)
    assert fresh.get_or_measure({"kind": "table"}, lambda: [3.0], lambda v: v) == [3.0] and fresh.measured == 1
    assert LatencyCache(tmp_path).get_or_measure({"kind": "table"}, lambda: [4.0], lambda v: v) == [3.0]
