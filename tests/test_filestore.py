"""FileStore: durable writes, and an exclusive write that never replaces a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.filestore import FileStore, InvalidUID, check_uid


def test_an_exclusive_write_keeps_the_file_that_is_there(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "data")
    assert store.write("instances/a/b/c.dcm", b"first", exclusive=True) == 5
    with pytest.raises(FileExistsError):
        store.write("instances/a/b/c.dcm", b"second", exclusive=True)
    assert store.read("instances/a/b/c.dcm") == b"first"
    assert not list(store.tmp_dir.iterdir())  # no temp file left either way
    assert store.write("instances/a/b/c.dcm", b"second") == 6  # the default replaces
    assert store.read("instances/a/b/c.dcm") == b"second"


@pytest.mark.parametrize("uid", ["1.2.3\n", "../1.2", "1.2/3", "1..2", "1.2.", "", "1" * 65])
def test_only_a_dotted_digit_string_becomes_a_path_component(uid: str) -> None:
    """A UID ending in a newline passed `re.match(...$)` and reached file names, the
    index and the log."""
    with pytest.raises(InvalidUID):
        check_uid("SOPInstanceUID", uid)
    assert check_uid("SOPInstanceUID", "1.2.840.10008.1") == "1.2.840.10008.1"
