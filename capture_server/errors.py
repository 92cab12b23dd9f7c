"""The moetrace error tree.

    MoetraceError(Exception)
    ├── StoreError
    │   ├── StoreNotFoundError(FileNotFoundError)  no store at the path
    │   ├── StoreFormatError                       not a moetrace store, or another format version
    │   ├── StoreCorruptError                      a chunk or index part cannot be decoded
    │   └── StoreWriteError(OSError)               the writer failed (disk full, permissions, ...)
    ├── CaptureError                               capture cannot be set up or run correctly
    │   └── CaptureSettingsError(ValueError)       settings name what the model does not have
    └── JobsDatabaseError                          the service's job records cannot be written

Every message names the path or setting concerned and fits on one line.
"""

from __future__ import annotations


class MoetraceError(Exception):
    """Base of all errors raised by moetrace."""


class StoreError(MoetraceError):
    """A routing store could not be opened, read or written."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """Raised when no store exists at the given path or URL."""


class StoreFormatError(StoreError):
    """Raised when the path holds something other than a store of a readable format version."""


class StoreCorruptError(StoreError):
    """Raised when stored bytes cannot be decoded (a truncated chunk, a damaged index part)."""


class StoreWriteError(StoreError, OSError):
    """Raised when the writer cannot persist data; committed sequences stay readable."""


class CaptureError(MoetraceError):
    """Raised when capture cannot be set up or would record wrong values."""


class CaptureUnsupportedError(CaptureError, ValueError):
    """Raised at start-up when the model or engine runs a routing path or layout whose
    capture could not be right."""


class CaptureSettingsError(CaptureError, ValueError):
    """Raised at start-up when capture settings name something the model does not have
    (a hidden-state layer past its MoE layers)."""


class JobsDatabaseError(MoetraceError):
    """Raised when the service's job database cannot be opened or written (a full or
    read-only disk); the message names the database file."""
