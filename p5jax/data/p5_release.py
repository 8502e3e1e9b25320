"""The folder format released with P5 (Geng et al., 2022), e.g. ``data/beauty``.

Files read (P5 ids are decimal strings, as in the release):
  datamaps.json         user2id, item2id (raw id -> P5 id), id2item
  sequential_data.txt   "<user> <item> <item> ..." per line, chronological
  negative_samples.txt  "<user> <neg> x 99" per line: P5's fixed test negatives
  review_splits.pkl     {"train"|"val"|"test": [review dict]}; keys reviewerID,
                        asin, overall, unixReviewTime, reviewText, summary (Yelp:
                        user_id / business_id / stars / date / text also accepted)
  exp_splits.pkl        optional, same splits: dicts with explanation, feature
  user_id2name.pkl      optional: P5 user id -> display name
  meta.json.gz          optional: item metadata, one Python-literal dict a line

Pickles are read with `load_plain_pickle`: an unpickler that refuses every
class/function reference, so only plain dicts, lists, tuples, strings, bytes,
numbers, booleans and None load; anything else -> DataError (loading arbitrary
pickles runs arbitrary code).

The release's own review/explanation splits are not reused: `processing`
re-splits with the leak-free protocol. Its test negatives are kept (test
candidates = target + those 99), matching P5's evaluation candidates.
"""
import datetime
import io
import json
import os
import pickle
from typing import Dict, List, Optional

from p5jax.data import amazon, parsing
from p5jax.data.errors import DataError
from p5jax.data.raw import Interaction, RawDataset, record_files


class _PlainUnpickler(pickle.Unpickler):
  """Admits only opcodes for built-in plain values: no classes, no callables."""

  def __init__(self, f, path: str):
    super().__init__(f)
    self._path = path

  def find_class(self, module, name):
    raise DataError(
        f"refusing to unpickle {module}.{name}: only plain containers, strings "
        "and numbers are allowed", path=self._path, field="<pickle>")

  def persistent_load(self, pid):
    raise DataError("refusing persistent ids in pickle", path=self._path,
                    field="<pickle>")


def load_plain_pickle(path: str):
  """pickle.load restricted to plain data (see module docstring)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return _PlainUnpickler(io.BytesIO(data), path).load()
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # corrupt pickle
    raise DataError(f"not a readable pickle ({type(e).__name__}: {e})", path=path,
                    field="<pickle>") from None


def _read_id_lines(path: str, user_ids: Dict[str, str], item_ids: Dict[str, str],
                   min_items: int) -> Dict[str, List[str]]:
  """Parses "<user> <item> ..." lines into raw user -> raw items."""
  out: Dict[str, List[str]] = {}
  for n, line in parsing.iter_lines(path):
    toks = line.split()
    if toks[0] not in user_ids:
      raise DataError(f"unknown user {toks[0]!r} (not in datamaps.json)",
                      path=path, line=n, field="user")
    if len(toks) - 1 < min_items:
      raise DataError(f"user {toks[0]} has {len(toks) - 1} items, need >= "
                      f"{min_items}", path=path, line=n, field="items")
    for k, t in enumerate(toks[1:], start=1):
      if t not in item_ids:
        raise DataError(f"unknown item {t!r} (not in datamaps.json)", path=path,
                        line=n, field=f"item[{k}]")
    raw_user = user_ids[toks[0]]
    if raw_user in out:
      raise DataError(f"user {toks[0]} appears twice", path=path, line=n,
                      field="user")
    out[raw_user] = [item_ids[t] for t in toks[1:]]
  return out


def _get(d: dict, keys, path: str, n: int, kind=str):
  for k in keys:
    if k in d and d[k] is not None:
      return parsing.require(d, k, path, n, kind)
  raise DataError("missing field", path=path, line=n, field=keys[0])


def _review_time(d: dict, path: str, n: int) -> int:
  if "unixReviewTime" in d:
    return parsing.to_int(d["unixReviewTime"], path, n, "unixReviewTime")
  if "date" in d:
    try:
      dt = datetime.datetime.strptime(str(d["date"]), "%Y-%m-%d %H:%M:%S")
    except ValueError:
      raise DataError(f"bad date {d['date']!r}", path=path, line=n,
                      field="date") from None
    return int(dt.replace(tzinfo=datetime.timezone.utc).timestamp())
  raise DataError("missing field", path=path, line=n, field="unixReviewTime")


def _split_records(obj, path: str) -> List[dict]:
  if not isinstance(obj, dict):
    raise DataError(f"expected a dict of splits, got {type(obj).__name__}",
                    path=path, field="<pickle>")
  out = []
  for split in ("train", "val", "test"):
    recs = obj.get(split, [])
    if not isinstance(recs, list):
      raise DataError(f"split must be a list, got {type(recs).__name__}", path=path,
                      field=split)
    for r in recs:
      if not isinstance(r, dict):
        raise DataError(f"record {len(out) + 1} is not a dict", path=path,
                        line=len(out) + 1, field=split)
      out.append(r)
  return out


def read(raw_dir: str) -> RawDataset:
  if not raw_dir or not os.path.isdir(raw_dir):
    raise DataError("the P5 release needs --raw_dir (e.g. P5/data/beauty)",
                    path=raw_dir, field="raw_dir")
  p = lambda n: os.path.join(raw_dir, n)
  for n in ("datamaps.json", "sequential_data.txt", "review_splits.pkl"):
    if not os.path.isfile(p(n)):
      raise DataError(f"missing {n}", path=raw_dir)
  try:
    with open(p("datamaps.json"), encoding="utf-8") as f:
      maps = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"bad JSON ({e.msg})", path=p("datamaps.json"), line=e.lineno,
                    field="<json>") from None
  for k in ("user2id", "item2id"):
    if not isinstance(maps.get(k), dict):
      raise DataError("missing or not an object", path=p("datamaps.json"), field=k)
  id2user = {str(v): str(k) for k, v in maps["user2id"].items()}
  id2item = {str(v): str(k) for k, v in maps["item2id"].items()}

  seqs = _read_id_lines(p("sequential_data.txt"), id2user, id2item, min_items=1)
  if not seqs:
    raise DataError("no user sequences", path=p("sequential_data.txt"))
  files = [p("datamaps.json"), p("sequential_data.txt"), p("review_splits.pkl")]
  fixed = None
  if os.path.isfile(p("negative_samples.txt")):
    fixed = _read_id_lines(p("negative_samples.txt"), id2user, id2item, min_items=1)
    files.append(p("negative_samples.txt"))

  rpath = p("review_splits.pkl")
  reviews = {}
  for n, r in enumerate(_split_records(load_plain_pickle(rpath), rpath), start=1):
    u = _get(r, ("reviewerID", "user_id"), rpath, n)
    i = _get(r, ("asin", "business_id"), rpath, n)
    rating = parsing.to_rating(_get(r, ("overall", "stars"), rpath, n, object),
                               rpath, n, "overall")
    reviews[(u, i)] = dict(rating=rating, timestamp=_review_time(r, rpath, n),
                           review_text=parsing.text(r, "reviewText") or
                           parsing.text(r, "text"),
                           summary=parsing.text(r, "summary"),
                           name=parsing.text(r, "reviewerName"))
  explanations = {}
  epath = p("exp_splits.pkl")
  if os.path.isfile(epath):
    files.append(epath)
    for n, r in enumerate(_split_records(load_plain_pickle(epath), epath), start=1):
      u = _get(r, ("reviewerID", "user_id"), epath, n)
      i = _get(r, ("asin", "business_id"), epath, n)
      explanations[(u, i)] = (parsing.text(r, "explanation"),
                              parsing.text(r, "feature"))

  names: Dict[str, str] = {}
  npath = p("user_id2name.pkl")
  if os.path.isfile(npath):
    files.append(npath)
    raw_names = load_plain_pickle(npath)
    if not isinstance(raw_names, dict):
      raise DataError("expected a dict", path=npath, field="<pickle>")
    names = {id2user[str(k)]: str(v) for k, v in raw_names.items()
             if str(k) in id2user and isinstance(v, str)}

  titles, meta = {}, {}
  mpath = p("meta.json.gz")
  if os.path.isfile(mpath):
    files.append(mpath)
    for n, line in parsing.iter_lines(mpath):
      obj = amazon.parse_meta_line(line, mpath, n)
      key = obj.get("asin", obj.get("business_id"))
      if key is not None:
        titles[str(key)] = parsing.text(obj, "title") or parsing.text(obj, "name")
        meta[str(key)] = {"brand": parsing.text(obj, "brand")}

  rows: List[Interaction] = []
  seq_path = p("sequential_data.txt")
  for line_no, (u, items) in enumerate(seqs.items(), start=1):
    for k, i in enumerate(items, start=1):
      rev = reviews.get((u, i))
      if rev is None:
        raise DataError(f"user {u!r} item {i!r} has no review in "
                        "review_splits.pkl", path=seq_path, line=line_no,
                        field=f"item[{k}]")
      if rev["name"] and u not in names:
        names[u] = rev["name"]
      exp, feat = explanations.get((u, i), ("", ""))
      rows.append(Interaction(u, i, rev["rating"], rev["timestamp"], row=len(rows),
                              review_text=rev["review_text"],
                              summary=rev["summary"], explanation=exp,
                              feature=feat))
  return RawDataset("p5", rows, user_names=names, item_titles=titles,
                    item_meta=meta, raw_files=record_files(files),
                    fixed_negatives=fixed, has_explanations=bool(explanations),
                    provenance={"p5_release": os.path.basename(
                        os.path.normpath(raw_dir))})
