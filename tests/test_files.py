"""deployments.core.files: a file is replaced whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.core.files import write_atomically


def test_writes_bytes_text_or_through_a_callable_and_creates_the_folder(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    assert write_atomically(target, "héllo") == target
    assert target.read_text(encoding="utf-8") == "héllo"
    write_atomically(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    write_atomically(str(target), lambda tmp: tmp.write_text("from a writer"))
    assert target.read_text() == "from a writer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old, whole")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half of a new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old, whole"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_threads_writing_one_path_at_once_each_publish_a_whole_file(tmp_path):
    """The bulk job stores photos from several threads: two writers of the same path must not
    share a temporary file (one's rename would publish the other's half-written one)."""
    import threading

    target = tmp_path / "photo.jpg"
    payloads = [bytes([i]) * 2_000_000 for i in (1, 2)]
    start, errors = threading.Barrier(3), []

    def write(data: bytes) -> None:
        start.wait()
        for _ in range(20):
            try:
                write_atomically(target, data)
            except OSError as error:  # the shared-name race surfaced as FileNotFoundError
                errors.append(error)

    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for w in writers:
        w.start()
    start.wait()
    seen = []
    while any(w.is_alive() for w in writers):
        if target.exists():
            seen.append(target.read_bytes())
    for w in writers:
        w.join()
    assert not errors
    assert all(s in payloads for s in seen)  # never a torn or empty file
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["photo.jpg"]
