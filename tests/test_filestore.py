"""FileStore: durable writes, and an exclusive write that never replaces a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.filestore import FileStore


def test_an_exclusive_write_keeps_the_file_that_is_there(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "data")
    assert store.write("instances/a/b/c.dcm", b"first", exclusive=True) == 5
    with pytest.raises(FileExistsError):
        store.write("instances/a/b/c.dcm", b"second", exclusive=True)
    assert store.read("instances/a/b/c.dcm") == b"first"
    assert not list(store.tmp_dir.iterdir())  # no temp file left either way
    assert store.write("instances/a/b/c.dcm", b"second") == 6  # the default replaces
    assert store.read("instances/a/b/c.dcm") == b"second"
