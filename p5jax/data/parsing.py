"""Small field parsers shared by the raw readers.

Each one turns a bad value into a `DataError` that names file, line and field.
"""
import gzip
import io
import json
import math
from typing import Iterator, Tuple

from p5jax.data.errors import DataError


def open_text(path: str, encoding: str = "utf-8"):
  """Opens plain or gzip text; `errors='strict'` so bad bytes are reported."""
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding)
  return open(path, "r", encoding=encoding, newline="")


def iter_lines(path: str, encoding: str = "utf-8") -> Iterator[Tuple[int, str]]:
  """Yields (1-based line number, line without newline), skipping blank lines."""
  try:
    with open_text(path, encoding) as f:
      for n, line in enumerate(f, start=1):
        line = line.rstrip("\r\n")
        if line.strip():
          yield n, line
  except UnicodeDecodeError as e:
    raise DataError(f"not valid {encoding} text ({e.reason})", path=path) from None
  except (OSError, EOFError) as e:  # truncated / corrupt gzip
    raise DataError(f"cannot read file: {e}", path=path) from None


def split_row(line: str, sep: str, ncols: int, path: str, n: int,
              at_least: bool = False):
  cols = line.split(sep)
  if len(cols) < ncols or (not at_least and len(cols) != ncols):
    want = f"at least {ncols}" if at_least else str(ncols)
    raise DataError(f"expected {want} {sep!r}-separated columns, got {len(cols)}",
                    path=path, line=n, field="<row>")
  return cols


def to_int(value, path: str, n: int, field: str) -> int:
  try:
    if isinstance(value, str):
      f = float(value.strip())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      f = float(value)
    else:
      raise ValueError
    if not math.isfinite(f) or f != int(f):
      raise ValueError
    return int(f)
  except (ValueError, OverflowError):
    raise DataError(f"expected an integer, got {value!r}", path=path, line=n,
                    field=field) from None


def to_float(value, path: str, n: int, field: str) -> float:
  try:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
      raise ValueError
    f = float(value)
    if not math.isfinite(f):
      raise ValueError
    return f
  except ValueError:
    raise DataError(f"expected a number, got {value!r}", path=path, line=n,
                    field=field) from None


def to_rating(value, path: str, n: int, field: str) -> float:
  r = to_float(value, path, n, field)
  if not 0.0 <= r <= 5.0:
    raise DataError(f"rating {r} outside [0, 5]", path=path, line=n, field=field)
  return r


def json_object(line: str, path: str, n: int) -> dict:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"bad JSON ({e.msg} at column {e.colno})", path=path, line=n,
                    field="<json>") from None
  if not isinstance(obj, dict):
    raise DataError(f"expected a JSON object, got {type(obj).__name__}",
                    path=path, line=n, field="<json>")
  return obj


def require(obj: dict, key: str, path: str, n: int, kind=str):
  """obj[key], checked to exist and be of `kind` (str ids must be non-empty)."""
  if key not in obj or obj[key] is None:
    raise DataError("missing field", path=path, line=n, field=key)
  v = obj[key]
  if kind is str:
    if not isinstance(v, (str, int)) or isinstance(v, bool) or str(v) == "":
      raise DataError(f"expected a non-empty string, got {v!r}", path=path,
                      line=n, field=key)
    return str(v)
  return v


def text(obj: dict, key: str) -> str:
  v = obj.get(key)
  return v.strip() if isinstance(v, str) else ""
