"""Amazon 2014 5-core review data (McAuley et al.): reviews + metadata.

Files in `raw_dir` for a category such as ``Beauty``:
  reviews_<Cat>_5.json.gz  JSON lines: reviewerID, asin, reviewerName, overall,
                           unixReviewTime, reviewText, summary, ...
  meta_<Cat>.json.gz       one *Python literal* dict per line (the 2014 dump is
                           not JSON: single quotes); parsed with
                           `ast.literal_eval`, which evaluates literals only
                           and never runs code. Optional: titles are "" without it.
"""
import ast
import os
from typing import Optional

from p5jax.data import parsing
from p5jax.data.errors import DataError
from p5jax.data.raw import Interaction, RawDataset, record_files


def _find(raw_dir: str, names) -> Optional[str]:
  for n in names:
    p = os.path.join(raw_dir, n)
    if os.path.isfile(p):
      return p
  return None


def parse_meta_line(line: str, path: str, n: int) -> dict:
  try:
    obj = ast.literal_eval(line)
  except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
    raise DataError(f"not a Python literal dict ({type(e).__name__})", path=path,
                    line=n, field="<record>") from None
  if not isinstance(obj, dict):
    raise DataError(f"expected a dict, got {type(obj).__name__}", path=path,
                    line=n, field="<record>")
  return obj


def read_meta(path: str):
  titles, meta = {}, {}
  for n, line in parsing.iter_lines(path):
    obj = parse_meta_line(line, path, n)
    asin = parsing.require(obj, "asin", path, n)
    titles[asin] = parsing.text(obj, "title")
    cats = obj.get("categories") or []
    meta[asin] = {
        "brand": parsing.text(obj, "brand"),
        "categories": [c for c in (cats[0] if cats and isinstance(cats[0], list)
                                   else []) if isinstance(c, str)],
    }
    if "price" in obj:
      meta[asin]["price"] = parsing.to_float(obj["price"], path, n, "price")
  return titles, meta


def read_reviews(path: str):
  rows, names = [], {}
  for n, line in parsing.iter_lines(path):
    obj = parsing.json_object(line, path, n)
    user = parsing.require(obj, "reviewerID", path, n)
    item = parsing.require(obj, "asin", path, n)
    rating = parsing.to_rating(parsing.require(obj, "overall", path, n, object),
                               path, n, "overall")
    ts = parsing.to_int(parsing.require(obj, "unixReviewTime", path, n, object),
                        path, n, "unixReviewTime")
    name = parsing.text(obj, "reviewerName")
    if name and user not in names:
      names[user] = name
    rows.append(Interaction(user, item, rating, ts, row=len(rows),
                            review_text=parsing.text(obj, "reviewText"),
                            summary=parsing.text(obj, "summary")))
  if not rows:
    raise DataError("no reviews", path=path)
  return rows, names


def read(raw_dir: str, category: str) -> RawDataset:
  if not raw_dir or not os.path.isdir(raw_dir):
    raise DataError("Amazon needs --raw_dir with reviews_<Cat>_5.json.gz",
                    path=raw_dir, field="raw_dir")
  cat = category[:1].upper() + category[1:]
  reviews = _find(raw_dir, (f"reviews_{cat}_5.json.gz", f"reviews_{cat}_5.json",
                            f"reviews_{category}_5.json.gz"))
  if reviews is None:
    raise DataError(f"missing reviews_{cat}_5.json.gz", path=raw_dir)
  meta_path = _find(raw_dir, (f"meta_{cat}.json.gz", f"meta_{cat}.json",
                              f"meta_{category}.json.gz"))
  rows, names = read_reviews(reviews)
  titles, meta = read_meta(meta_path) if meta_path else ({}, {})
  files = [reviews] + ([meta_path] if meta_path else [])
  return RawDataset("amazon", rows, user_names=names, item_titles=titles,
                    item_meta=meta, raw_files=record_files(files),
                    provenance={"category": cat, "has_metadata": bool(meta_path)})
