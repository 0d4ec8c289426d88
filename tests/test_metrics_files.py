"""A /metrics scrape that meets a process's metrics file while that process creates it.

prometheus_client's MmapedDict opens a file and only then sizes it, so the API server's
MultiProcessCollector can read 0 bytes; unpatched, the whole scrape raised `struct.error`
(HTTP 500: seen in this project's CI on 2026-12-07, tests/test_e2e_vllm.py's fixture). The
hook `metrics_files_being_created` reads such a file as holding nothing yet."""

from __future__ import annotations

import os
import struct

import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from vllm_eplb.integration import hooks
from vllm_eplb.integration.metrics import empty_files_read_as_empty


def _worker_file(path, value: float) -> None:
    """A file as a worker leaves it: one counter sample."""
    d = MmapedDict(os.path.join(path, "counter_101.db"))
    key = '["vllm:eplb_cycles", "vllm:eplb_cycles_total", {"rank": "0"}, "cycles"]'
    d.write_value(key, value, 0.0)
    d.close()


def _samples(path) -> dict:
    return {s.name: s.value for m in MultiProcessCollector(None, path=str(path)).collect() for s in m.samples}


def test_a_file_being_created_reads_as_empty_and_the_others_are_served(tmp_path, monkeypatch):
    _worker_file(tmp_path, 7.0)
    (tmp_path / "counter_202.db").write_bytes(b"")  # opened by its process, not sized yet
    (tmp_path / "gauge_mostrecent_303.db").write_bytes(b"\x00" * 4)  # a read racing a partial size
    with pytest.raises(struct.error):  # what the scrape did without the hook
        _samples(tmp_path)

    original = MmapedDict.__dict__["read_all_values_from_file"]
    monkeypatch.setattr(MmapedDict, "read_all_values_from_file", empty_files_read_as_empty(original.__func__))
    assert _samples(tmp_path) == {"vllm:eplb_cycles_total": 7.0}


def test_a_corrupt_file_still_raises(tmp_path, monkeypatch):
    original = MmapedDict.__dict__["read_all_values_from_file"]
    monkeypatch.setattr(MmapedDict, "read_all_values_from_file", empty_files_read_as_empty(original.__func__))
    # a header claiming 64 bytes used, one entry whose key length runs past the file's end
    (tmp_path / "counter_404.db").write_bytes(struct.pack("i", 64) + b"\x00" * 4 + struct.pack("i", 500) + b"x" * 8)
    with pytest.raises((struct.error, RuntimeError, UnicodeDecodeError, ValueError)):
        _samples(tmp_path)


def test_the_hook_targets_the_reader_and_wraps_it_once():
    h = hooks.named("metrics_files_being_created")
    assert h.resolve() is MmapedDict.read_all_values_from_file or getattr(h.resolve(), "_vllm_eplb_empty_ok", False)
    once = h.swap(MmapedDict.__dict__["read_all_values_from_file"].__func__)
    assert isinstance(once, staticmethod) and once.__func__._vllm_eplb_empty_ok
    assert h.swap(once.__func__) is once.__func__  # installed already: left as it is
