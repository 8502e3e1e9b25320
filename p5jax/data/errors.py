"""Errors raised by the data layer: one exception, one clear message.

Every problem with user-supplied data (a malformed row, a bad checksum, an
unknown id, an unsafe pickle) surfaces as a `DataError` whose message names
the file, the 1-based line (or record) and the field, so the user can open the
file and fix it instead of reading a deep traceback.
"""
from typing import Optional


class DataError(ValueError):
  """Bad or inconsistent input data.

  Attributes:
    path: file the problem is in (or None when it is not tied to one file).
    line: 1-based line / record number in `path`, or None.
    field: name of the offending field / column, or None.
    reason: human-readable description of what is wrong.
  """

  def __init__(self, reason: str, *, path: Optional[str] = None,
               line: Optional[int] = None, field: Optional[str] = None):
    self.path, self.line, self.field, self.reason = path, line, field, reason
    where = []
    if path is not None:
      where.append(str(path))
    if line is not None:
      where.append(f"line {line}")
    if field is not None:
      where.append(f"field {field!r}")
    prefix = ", ".join(where)
    super().__init__(f"{prefix}: {reason}" if prefix else reason)


class ChecksumError(DataError):
  """A downloaded or cached file does not have the expected sha256."""

  def __init__(self, path: str, expected: str, actual: str):
    self.expected, self.actual = expected, actual
    super().__init__(f"sha256 mismatch: expected {expected}, got {actual}",
                     path=path)
