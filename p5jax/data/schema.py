"""The prepared-data contract shared by `p5jax.data` (writer) and `tasks/` (reader).

Layout under a *data root* (``--out_dir`` of ``python -m p5jax.data.prepare``;
resolved by `data_root()`: explicit `set_data_root()`, else ``$P5JAX_DATA_DIR``,
else ``~/.cache/p5jax/data``)::

  <root>/<name>/manifest.json   dataset, source, indexing, seed, kcore, counts,
                                families, sha256 of every file below ("files")
                                and of the raw inputs ("raw_files"), provenance
  <root>/<name>/datamaps.json   user2id / item2id (raw id -> p5 id), id2user,
                                id2item, user_names {p5 id: name},
                                item_titles {p5 id: title},
                                item_meta {p5 id: {"genres": .., "brand": ..}}
  <root>/<name>/sequential.jsonl  one JSON object per user (all splits' source):
                                {"user_id", "user_name", "items": [chronological
                                p5 ids], "timestamps", "candidates":
                                {"validation": [100], "test": [100]},
                                "negatives": [99]}
  <root>/<name>/reviews.jsonl     one JSON object per review: the `reviews`
                                features below plus "split"
  <root>/<name>/corpus.txt        text for the vocabulary trainer, one unique
                                line each: item titles, genres / categories /
                                brands, user names, and summaries, review texts
                                and explanations of *training* reviews only
  <root>/<name>/spiece.model      SentencePiece model (T5 id layout), see vocab.py
  <root>/tfds/p5_<name>/{sequential,reviews}/<VERSION>/...   TFDS-built splits

`prepare` replaces <root>/<name>/ and <root>/tfds/p5_<name>/ as a whole (so a
re-prepare also drops a stale spiece.model: the vocabulary must be retrained).
TFDS builders: `p5jax.data.tfds_builder` (import it to register them).

``<name>`` is a dataset key from `DATASETS` (e.g. ``ml100k``, ``amazon_beauty``).
P5 ids are decimal strings starting at "1" ("user_23", "item_7391" in prompts).

Item tokens (``prepare --item_tokens``, manifest ``"item_tokens": true``): every
item id is also one vocabulary piece, written ``<i7391>`` in prompts and
targets (`item_token`), so the model reads and writes an item as one token
instead of its digits (independent indexing; the id numbers still come from
the chosen indexing). The TFDS data and ``datamaps.json`` keep bare ids.

TFDS features (every split is ``train`` / ``validation`` / ``test``):

sequential (one example per user; leave-one-out):
  user_id     string  p5 user id
  user_name   string  display name or "" (Amazon reviewerName; ML-100K: "")
  history     [string]  train: items[:-2]; validation: items[:-2]; test: items[:-1]
                        (chronological, oldest first; never contains the target)
  target      string  "" in train; validation: items[-2]; test: items[-1]
  candidates  [string]  validation/test: 100 items = target + 99 items the user
                        never touched, shuffled, sampled once with the seed;
                        train: empty
  negatives   [string]  99 items the user never touched (fixed sample), for
                        direct-family training negatives; same in all splits

reviews (one example per user-item rating/review; 80/10/10 split, every user
and item appears in train whenever it has a review allowed there -- see
counts items/users_without_train_review; pairs that are sequential
validation/test targets are never in the reviews train split -- that would
leak the held-out item):
  user_id, item_id, user_name, item_title   string
  rating      float32  1..5
  timestamp   int64
  review_text string  "" when the dataset has no text (ML-100K)
  summary     string  review summary / title, or ""
  explanation string  one sentence of the review that explains it, or ""
  feature     string  one feature word that occurs in `explanation`, or ""
              (derived when the source has none: explanation = first sentence
              with >= 4 words; feature = its non-stopword word found in the
              most training reviews of that item; see processing.py)

Candidates, negatives and splits are sampled in a canonical order of raw ids,
so they are the same raw items under every item indexing.
"""
import dataclasses
import json
import os
from typing import Optional

SPLITS = ("train", "validation", "test")
TFDS_VERSION = "1.0.0"
FAMILIES = ("rating", "sequential", "explanation", "review", "direct")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset kind (known before any data is prepared)."""
  name: str            # key used in paths, task names and TFDS names
  source: str          # reader: "movielens" | "amazon" | "yelp" | "p5"
  families: tuple      # prompt families its fields support
  has_reviews: bool
  item_noun: str = "item"  # word for items in prompts ("movie", "business")


_TEXT_FAMILIES = FAMILIES
DATASETS = {
    "ml100k": DatasetSpec("ml100k", "movielens", ("rating", "sequential", "direct"),
                          has_reviews=False, item_noun="movie"),
    "amazon_beauty": DatasetSpec("amazon_beauty", "amazon", _TEXT_FAMILIES, True),
    "amazon_sports": DatasetSpec("amazon_sports", "amazon", _TEXT_FAMILIES, True),
    "amazon_toys": DatasetSpec("amazon_toys", "amazon", _TEXT_FAMILIES, True),
    "yelp": DatasetSpec("yelp", "yelp", _TEXT_FAMILIES, True, item_noun="business"),
}

_DATA_ROOT: Optional[str] = None


def set_data_root(path: Optional[str]) -> None:
  """Points every reader (tasks, vocab, tfds) at `path`; None restores default."""
  global _DATA_ROOT
  _DATA_ROOT = None if path is None else os.path.abspath(os.path.expanduser(path))


def data_root() -> str:
  if _DATA_ROOT:
    return _DATA_ROOT
  env = os.environ.get("P5JAX_DATA_DIR")
  if env:
    return os.path.abspath(os.path.expanduser(env))
  return os.path.expanduser("~/.cache/p5jax/data")


def dataset_dir(name: str, root: Optional[str] = None) -> str:
  return os.path.join(root or data_root(), name)


def tfds_dir(root: Optional[str] = None) -> str:
  return os.path.join(root or data_root(), "tfds")


def read_manifest(name: str, root: Optional[str] = None) -> dict:
  """``<root>/<name>/manifest.json`` as a dict ({} when not prepared)."""
  path = os.path.join(dataset_dir(name, root), "manifest.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


ITEM_TOKEN_PREFIX, ITEM_TOKEN_SUFFIX = "<i", ">"


def item_token(item_id: str) -> str:
  """The vocabulary piece of an item under item tokens: "7391" -> "<i7391>"."""
  return f"{ITEM_TOKEN_PREFIX}{item_id}{ITEM_TOKEN_SUFFIX}"


def uses_item_tokens(name: str, root: Optional[str] = None) -> bool:
  """Whether the prepared dataset writes items as tokens (see module doc)."""
  return bool(read_manifest(name, root).get("item_tokens", False))


def tfds_name(name: str, config: str) -> str:
  """E.g. tfds_name("ml100k", "sequential") == "p5_ml100k/sequential:1.0.0"."""
  return f"p5_{name}/{config}:{TFDS_VERSION}"
