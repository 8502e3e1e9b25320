"""Yelp Open / academic dataset: businesses are the items.

Files in `raw_dir` (JSON lines; the ``yelp_academic_dataset_`` prefix of the
official archive is optional):
  business.json  business_id, name, city, categories ("A, B" or a list), ...
  review.json    review_id, user_id, business_id, stars, date
                 ("YYYY-MM-DD HH:MM:SS"), text
  user.json      optional: user_id, name (display names for prompts)

Reviews of a business missing from business.json are an error (unknown item).
Yelp reviews have no summary; `summary` stays "".
"""
import datetime
import os
from typing import Optional

from p5jax.data import parsing
from p5jax.data.errors import DataError
from p5jax.data.raw import Interaction, RawDataset, record_files

_PREFIX = "yelp_academic_dataset_"


def _find(raw_dir: str, name: str) -> Optional[str]:
  for n in (name, _PREFIX + name, name + ".gz", _PREFIX + name + ".gz"):
    p = os.path.join(raw_dir, n)
    if os.path.isfile(p):
      return p
  return None


def _timestamp(value, path: str, n: int) -> int:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return parsing.to_int(value, path, n, "date")
  try:
    dt = datetime.datetime.strptime(str(value).strip(), "%Y-%m-%d %H:%M:%S")
  except ValueError:
    try:
      dt = datetime.datetime.strptime(str(value).strip(), "%Y-%m-%d")
    except ValueError:
      raise DataError(f"expected 'YYYY-MM-DD HH:MM:SS', got {value!r}", path=path,
                      line=n, field="date") from None
  return int(dt.replace(tzinfo=datetime.timezone.utc).timestamp())


def read(raw_dir: str) -> RawDataset:
  if not raw_dir or not os.path.isdir(raw_dir):
    raise DataError("Yelp needs --raw_dir with business.json and review.json",
                    path=raw_dir, field="raw_dir")
  bpath, rpath = _find(raw_dir, "business.json"), _find(raw_dir, "review.json")
  for name, p in (("business.json", bpath), ("review.json", rpath)):
    if p is None:
      raise DataError(f"missing {name}", path=raw_dir)
  titles, meta = {}, {}
  for n, line in parsing.iter_lines(bpath):
    obj = parsing.json_object(line, bpath, n)
    bid = parsing.require(obj, "business_id", bpath, n)
    titles[bid] = parsing.text(obj, "name")
    cats = obj.get("categories") or []
    if isinstance(cats, str):
      cats = [c.strip() for c in cats.split(",") if c.strip()]
    meta[bid] = {"city": parsing.text(obj, "city"),
                 "categories": [c for c in cats if isinstance(c, str)]}
  rows = []
  for n, line in parsing.iter_lines(rpath):
    obj = parsing.json_object(line, rpath, n)
    user = parsing.require(obj, "user_id", rpath, n)
    item = parsing.require(obj, "business_id", rpath, n)
    if item not in titles:
      raise DataError(f"unknown business {item!r} (not in business.json)",
                      path=rpath, line=n, field="business_id")
    rating = parsing.to_rating(parsing.require(obj, "stars", rpath, n, object),
                               rpath, n, "stars")
    ts = _timestamp(parsing.require(obj, "date", rpath, n, object), rpath, n)
    rows.append(Interaction(user, item, rating, ts, row=len(rows),
                            review_text=parsing.text(obj, "text")))
  if not rows:
    raise DataError("no reviews", path=rpath)
  names, files = {}, [bpath, rpath]
  upath = _find(raw_dir, "user.json")
  if upath:
    files.append(upath)
    reviewers = {x.user for x in rows}  # user.json is large: keep only these
    for n, line in parsing.iter_lines(upath):
      obj = parsing.json_object(line, upath, n)
      uid = parsing.require(obj, "user_id", upath, n)
      if uid in reviewers:
        names[uid] = parsing.text(obj, "name")
  return RawDataset("yelp", rows, user_names=names, item_titles=titles,
                    item_meta=meta, raw_files=record_files(files))
