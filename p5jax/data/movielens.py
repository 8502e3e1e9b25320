"""MovieLens-100K: find, fetch, verify, cache and read it.

Where the raw files come from, in order:
  1. a folder the user gives (`raw_dir`), in GroupLens layout (``u.data``,
     ``u.item``, ``u.user``) or RecBole atomic layout (``ml-100k.inter``,
     ``ml-100k.item``, ``ml-100k.user``); its checksums are recorded, and the
     manifest says whether the ratings match the official release;
  2. the cache ``$P5JAX_CACHE_DIR/raw/ml-100k`` (default ``~/.cache/p5jax``),
     re-verified on every use;
  3. the official GroupLens archive (short timeout);
  4. the copy inside the ``recbole==1.2.1`` wheel, fetched with
     ``pip download --no-deps`` (works on machines that reach only the package
     registry); wheel and files are checked against pinned sha256.

Fetched data is verified before it enters the cache; a mismatch raises
`ChecksumError` naming the file and both hashes. The data is never committed.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from typing import Dict, List, Optional, Tuple

from absl import logging

from p5jax.data import parsing
from p5jax.data.errors import ChecksumError, DataError
from p5jax.data.raw import Interaction, RawDataset, record_files, sha256_file

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
# sha256 of the 100,000 ratings as sorted "user\titem\trating\ttimestamp\n" rows.
# Format-independent, so it verifies the GroupLens archive and the RecBole copy
# alike (computed from the pinned RecBole files above).
RATINGS_CONTENT_SHA256 = "3c61dc9b90a365d2ac50bdee9df8024ddf0eea4b1a15678d9934a77e75fe0ede"
GROUPLENS_FILES = ("u.data", "u.item", "u.user")
RECBOLE_FILES = tuple(RECBOLE_SHA256)
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
          "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
          "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_URL_TIMEOUT_S = 10
_PIP_TIMEOUT_S = 300


def cache_dir() -> str:
  """Raw-data cache for ML-100K (``$P5JAX_CACHE_DIR`` or ``~/.cache/p5jax``)."""
  base = os.environ.get("P5JAX_CACHE_DIR") or os.path.expanduser("~/.cache/p5jax")
  return os.path.join(base, "raw", "ml-100k")


def detect_layout(folder: str) -> Optional[str]:
  """"grouplens" | "recbole" | None for the files present in `folder`."""
  has = lambda names: all(os.path.isfile(os.path.join(folder, n)) for n in names)
  if has(("u.data", "u.item")):
    return "grouplens"
  if has(("ml-100k.inter", "ml-100k.item")):
    return "recbole"
  return None


# ----------------------------------------------------------------- acquisition


def _verify(path: str, expected: str) -> None:
  actual = sha256_file(path)
  if actual != expected:
    raise ChecksumError(path, expected, actual)


def _verify_cached(folder: str) -> Optional[str]:
  layout = detect_layout(folder)
  if layout == "recbole":
    for name, digest in RECBOLE_SHA256.items():
      _verify(os.path.join(folder, name), digest)
  elif layout == "grouplens":
    path = os.path.join(folder, "u.data")
    actual = ratings_content_sha256(read_ratings(folder, layout))
    if actual != RATINGS_CONTENT_SHA256:
      raise ChecksumError(path, RATINGS_CONTENT_SHA256, actual)
  return layout


def _install(src_dir: str, names, dest: str) -> None:
  """Moves verified files into the cache atomically (temp dir, then rename)."""
  parent = os.path.dirname(dest)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".ml-100k-", dir=parent)
  try:
    for n in names:
      shutil.copyfile(os.path.join(src_dir, n), os.path.join(tmp, n))
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.rename(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _fetch_grouplens(work: str) -> str:
  zpath = os.path.join(work, "ml-100k.zip")
  with urllib.request.urlopen(GROUPLENS_URL, timeout=_URL_TIMEOUT_S) as r, \
      open(zpath, "wb") as f:
    shutil.copyfileobj(r, f)
  out = os.path.join(work, "grouplens")
  os.makedirs(out)
  with zipfile.ZipFile(zpath) as z:
    for n in GROUPLENS_FILES:
      with z.open("ml-100k/" + n) as src, open(os.path.join(out, n), "wb") as dst:
        shutil.copyfileobj(src, dst)
  path = os.path.join(out, "u.data")
  actual = ratings_content_sha256(read_ratings(out, "grouplens"))
  if actual != RATINGS_CONTENT_SHA256:
    raise ChecksumError(GROUPLENS_URL + "!ml-100k/u.data", RATINGS_CONTENT_SHA256,
                        actual)
  return out


def _fetch_recbole_wheel(work: str) -> str:
  wheel_dir = os.path.join(work, "wheel")
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
         "--disable-pip-version-check", "-q", "-d", wheel_dir, RECBOLE_REQUIREMENT]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
  if proc.returncode != 0:
    raise DataError(f"`{' '.join(cmd[2:])}` failed: {proc.stderr.strip()[-500:]}")
  wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
  if len(wheels) != 1:
    raise DataError(f"expected one wheel from pip download, got {wheels}")
  wheel = os.path.join(wheel_dir, wheels[0])
  _verify(wheel, RECBOLE_WHEEL_SHA256)
  out = os.path.join(work, "recbole")
  os.makedirs(out)
  with zipfile.ZipFile(wheel) as z:
    for n in RECBOLE_FILES:
      with z.open(RECBOLE_MEMBER_DIR + n) as src, \
          open(os.path.join(out, n), "wb") as dst:
        shutil.copyfileobj(src, dst)
  for n, digest in RECBOLE_SHA256.items():
    _verify(os.path.join(out, n), digest)
  return out


def ensure_raw(raw_dir: Optional[str] = None, *, allow_download: bool = True
               ) -> Tuple[str, str, bool]:
  """Locates ML-100K raw files, fetching and caching them when needed.

  Args:
    raw_dir: a user folder with GroupLens or RecBole files (also accepted: its
      ``ml-100k`` subfolder). Given but empty of both layouts -> DataError.
    allow_download: False -> only the user folder and the cache are tried.

  Returns:
    (folder, layout, user_given) with layout "grouplens" | "recbole".
  """
  if raw_dir:
    for cand in (raw_dir, os.path.join(raw_dir, "ml-100k")):
      layout = detect_layout(cand)
      if layout:
        return cand, layout, True
    raise DataError("no MovieLens-100K files here: need u.data + u.item "
                    "(GroupLens) or ml-100k.inter + ml-100k.item (RecBole)",
                    path=raw_dir)
  cached = cache_dir()
  if detect_layout(cached):
    return cached, _verify_cached(cached), False
  if not allow_download:
    raise DataError("MovieLens-100K is not cached and downloads are off",
                    path=cached)
  errors = []
  with tempfile.TemporaryDirectory(prefix="p5jax-ml100k-") as work:
    fetchers = (("GroupLens archive", _fetch_grouplens, GROUPLENS_FILES),
                ("recbole wheel", _fetch_recbole_wheel, RECBOLE_FILES))
    for what, fetch, names in fetchers:
      try:
        src = fetch(work)
      except ChecksumError:
        raise  # wrong bytes are an error, never a reason to try elsewhere
      except (OSError, DataError, subprocess.SubprocessError, zipfile.BadZipFile,
              KeyError) as e:
        logging.info("ML-100K via %s unavailable: %s", what, e)
        errors.append(f"{what}: {e}")
        continue
      _install(src, names, cached)
      return cached, detect_layout(cached), False
  raise DataError("could not obtain MovieLens-100K; pass --raw_dir with the "
                  "files. Tried: " + " | ".join(errors))


def is_cached() -> bool:
  return detect_layout(cache_dir()) is not None


# --------------------------------------------------------------------- reading


def read_ratings(folder: str, layout: str, known_items=None) -> List[Interaction]:
  """Parses the ratings file; `known_items` (optional) must contain every item."""
  if layout == "grouplens":
    path, sep, skip_header = os.path.join(folder, "u.data"), "\t", False
  else:
    path, sep, skip_header = os.path.join(folder, "ml-100k.inter"), "\t", True
  out = []
  cols = ("user_id", "item_id", "rating", "timestamp")
  for n, line in parsing.iter_lines(path):
    if skip_header and n == 1:
      if not line.startswith("user_id"):
        raise DataError("expected a RecBole header 'user_id:token ...'", path=path,
                        line=1, field="<header>")
      continue
    u, i, r, t = parsing.split_row(line, sep, 4, path, n)
    for name, v in zip(cols[:2], (u, i)):
      parsing.to_int(v, path, n, name)  # ML ids are integers; check it
    if known_items is not None and str(int(i)) not in known_items:
      raise DataError(f"unknown item {i}: not in the item file", path=path,
                      line=n, field="item_id")
    out.append(Interaction(
        user=str(int(u)), item=str(int(i)),
        rating=parsing.to_rating(r, path, n, "rating"),
        timestamp=parsing.to_int(t, path, n, "timestamp"), row=len(out)))
  if not out:
    raise DataError("no ratings", path=path)
  return out


def ratings_content_sha256(rows: List[Interaction]) -> str:
  lines = sorted(f"{x.user}\t{x.item}\t{int(x.rating)}\t{x.timestamp}\n" for x in rows)
  return hashlib.sha256("".join(lines).encode()).hexdigest()


def _read_items(folder: str, layout: str) -> Tuple[Dict[str, str], Dict[str, dict]]:
  titles, meta = {}, {}
  if layout == "grouplens":
    path = os.path.join(folder, "u.item")
    for n, line in parsing.iter_lines(path, encoding="latin-1"):
      cols = parsing.split_row(line, "|", 5 + len(GENRES), path, n)
      iid = str(parsing.to_int(cols[0], path, n, "movie_id"))
      flags = cols[5:]
      for g, f in zip(GENRES, flags):
        if f not in ("0", "1"):
          raise DataError(f"genre flag must be 0/1, got {f!r}", path=path, line=n,
                          field=g)
      titles[iid] = cols[1].strip()
      meta[iid] = {"genres": [g for g, f in zip(GENRES, flags) if f == "1"],
                   "release_date": cols[2].strip()}
  else:
    path = os.path.join(folder, "ml-100k.item")
    for n, line in parsing.iter_lines(path):
      if n == 1:
        continue
      cols = parsing.split_row(line, "\t", 4, path, n)
      iid = str(parsing.to_int(cols[0], path, n, "item_id"))
      title, year = cols[1].strip(), cols[2].strip()
      # Same title string as GroupLens ("Toy Story (1995)") whichever the source.
      titles[iid] = f"{title} ({year})" if year else title
      meta[iid] = {"genres": cols[3].split(), "release_year": year}
  return titles, meta


def read(raw_dir: Optional[str] = None, *, allow_download: bool = True
         ) -> RawDataset:
  """Reads ML-100K (see module docstring for where it comes from)."""
  folder, layout, user_given = ensure_raw(raw_dir, allow_download=allow_download)
  titles, meta = _read_items(folder, layout)
  rows = read_ratings(folder, layout, known_items=titles)
  names = GROUPLENS_FILES if layout == "grouplens" else RECBOLE_FILES
  paths = [os.path.join(folder, n) for n in names
           if os.path.isfile(os.path.join(folder, n))]
  official = ratings_content_sha256(rows) == RATINGS_CONTENT_SHA256
  return RawDataset(
      source="movielens", interactions=rows, item_titles=titles, item_meta=meta,
      raw_files=record_files(paths),
      provenance={"raw_layout": layout, "user_given": user_given,
                  "matches_official_ml100k": official})
