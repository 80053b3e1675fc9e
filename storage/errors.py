"""Errors of the storage layer that callers report without importing the database code
(the CLI catches them for every command, most of which never open the index)."""

from __future__ import annotations


class IndexUnavailable(RuntimeError):
    """The index database cannot be opened (a server down, a wrong URL, no driver)."""
