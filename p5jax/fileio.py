"""Small file helpers shared by the library."""
import os
import tempfile


def atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temp file in the same folder, then renames.

  A reader never sees a half-written file, and a failure leaves no temp file.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
