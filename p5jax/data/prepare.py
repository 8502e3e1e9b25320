r"""Prepares a dataset: read raw files, run the protocol, write the layout.

  python -m p5jax.data.prepare --dataset=ml-100k --out_dir=/tmp/p5data
  python -m p5jax.data.prepare --dataset=amazon --category=Beauty \
      --raw_dir=/data/amazon --out_dir=/tmp/p5data --indexing=sequential
  python -m p5jax.data.prepare --dataset=p5 --category=beauty \
      --raw_dir=P5/data/beauty --out_dir=/tmp/p5data

prints the dataset statistics as one JSON line. The output layout (under
``out_dir``, the *data root*) is documented in `schema.py`. Everything is built
in a temporary folder inside ``out_dir`` and renamed into place at the end, so
a failure leaves ``out_dir`` as it was.
"""
import json
import os
import shutil
import sys
import tempfile
from typing import Optional, Tuple

from absl import app
from absl import flags

from p5jax.data import processing
from p5jax.data import schema
from p5jax.data.errors import DataError
from p5jax.data.raw import RawDataset, sha256_file

MANIFEST_VERSION = 1
_DATASET_ALIASES = {"ml-100k": "ml100k", "ml100k": "ml100k", "movielens": "ml100k",
                    "amazon": "amazon", "yelp": "yelp", "p5": "p5"}
_P5_RELEASE_KEYS = {"beauty": "amazon_beauty", "sports": "amazon_sports",
                    "toys": "amazon_toys", "yelp": "yelp"}
# Dataset key -> the category as spelled in the Amazon 2014 file names.
AMAZON_FILE_CATEGORIES = {"amazon_beauty": "Beauty",
                          "amazon_sports": "Sports_and_Outdoors",
                          "amazon_toys": "Toys_and_Games"}


def resolve(dataset: str, category: Optional[str] = None) -> Tuple[str, str]:
  """CLI dataset name (+ category) -> (schema key, reader source)."""
  kind = _DATASET_ALIASES.get(dataset.lower())
  if kind is None and dataset in schema.DATASETS:
    return dataset, schema.DATASETS[dataset].source
  if kind == "ml100k":
    return "ml100k", "movielens"
  if kind == "yelp":
    return "yelp", "yelp"
  if kind in ("amazon", "p5"):
    if not category:
      raise DataError(f"--dataset={dataset} needs --category (e.g. Beauty)",
                      field="category")
    cat = category.lower()
    file_keys = {v.lower(): k for k, v in AMAZON_FILE_CATEGORIES.items()}
    key = _P5_RELEASE_KEYS.get(cat) if kind == "p5" else file_keys.get(cat, f"amazon_{cat}")
    if key not in schema.DATASETS:
      raise DataError(f"no dataset key for category {category!r}; known keys: "
                      f"{sorted(schema.DATASETS)} (add one to schema.DATASETS)",
                      field="category")
    return key, kind
  raise DataError(f"unknown dataset {dataset!r}; choose from "
                  "ml-100k, amazon, yelp, p5", field="dataset")


def read_raw(source: str, raw_dir: Optional[str], category: Optional[str],
             allow_download: bool = True) -> RawDataset:
  # Imported lazily: each reader is only needed for its own source.
  if source == "movielens":
    from p5jax.data import movielens  # pylint: disable=g-import-not-at-top
    return movielens.read(raw_dir, allow_download=allow_download)
  if source == "amazon":
    from p5jax.data import amazon  # pylint: disable=g-import-not-at-top
    return amazon.read(raw_dir, category)
  if source == "yelp":
    from p5jax.data import yelp  # pylint: disable=g-import-not-at-top
    return yelp.read(raw_dir)
  from p5jax.data import p5_release  # pylint: disable=g-import-not-at-top
  return p5_release.read(raw_dir)


def _write_jsonl(path: str, records) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=True)
    f.write("\n")


def corpus_lines(raw: RawDataset, p: processing.Processed):
  """Text for the vocabulary trainer (see schema.py: corpus.txt)."""
  seen = set()
  id2item = {v: k for k, v in p.item2id.items()}
  def emit(s):
    s = " ".join(str(s).split())
    if s and s not in seen:
      seen.add(s)
      yield s
  for i in range(1, len(id2item) + 1):
    yield from emit(raw.item_titles.get(id2item[i], ""))
    meta = raw.item_meta.get(id2item[i], {})
    for k in ("genres", "categories"):
      yield from emit(" ".join(meta.get(k, [])))
    yield from emit(meta.get("brand", ""))
  for u in p.users:
    yield from emit(u["user_name"])
  for r in p.reviews:
    if r["split"] == "train":  # held-out review text stays out of the vocab
      yield from emit(r["summary"])
      yield from emit(r["review_text"])
      yield from emit(r["explanation"])


def _write_dataset(folder: str, key: str, source: str, raw: RawDataset,
                   p: processing.Processed, config: processing.ProcessingConfig
                   ) -> dict:
  os.makedirs(folder)
  id2user = {v: k for k, v in p.user2id.items()}
  id2item = {v: k for k, v in p.item2id.items()}
  datamaps = {
      "user2id": {u: str(i) for u, i in p.user2id.items()},
      "item2id": {u: str(i) for u, i in p.item2id.items()},
      "id2user": {str(i): u for i, u in sorted(id2user.items())},
      "id2item": {str(i): u for i, u in sorted(id2item.items())},
      "user_names": {str(p.user2id[u]): n for u, n in raw.user_names.items()
                     if u in p.user2id and n},
      "item_titles": {str(i): raw.item_titles.get(it, "")
                      for i, it in sorted(id2item.items())},
      "item_meta": {str(i): raw.item_meta.get(it, {})
                    for i, it in sorted(id2item.items())},
  }
  _write_json(os.path.join(folder, "datamaps.json"), datamaps)
  _write_jsonl(os.path.join(folder, "sequential.jsonl"), p.users)
  _write_jsonl(os.path.join(folder, "reviews.jsonl"), p.reviews)
  with open(os.path.join(folder, "corpus.txt"), "w", encoding="utf-8") as f:
    for line in corpus_lines(raw, p):
      f.write(line + "\n")
  # The vocabulary is part of the prepared data: tasks tokenize with it.
  from p5jax import vocab  # pylint: disable=g-import-not-at-top
  item_symbols = ([schema.item_token(str(i)) for i in sorted(id2item)]
                  if config.item_tokens else [])
  vocab.build_dataset_vocabulary(folder, key, item_symbols=item_symbols)
  spec = schema.DATASETS[key]
  files = {n: sha256_file(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}
  manifest = {
      "manifest_version": MANIFEST_VERSION, "dataset": key, "source": source,
      "indexing": config.indexing, "seed": config.seed, "kcore": config.kcore,
      "item_tokens": config.item_tokens,
      "num_candidates": config.num_candidates,
      "families": list(spec.families), "has_reviews": spec.has_reviews,
      "counts": p.stats, "files": files, "raw_files": raw.raw_files,
      "provenance": raw.provenance,
      "tfds": {c: schema.tfds_name(key, c) for c in ("sequential", "reviews")},
  }
  _write_json(os.path.join(folder, "manifest.json"), manifest)
  return manifest


def _commit(tmp: str, out_dir: str, moves) -> None:
  """Renames each (src, dst) into place; on failure restores what was there."""
  done, backups = [], []
  try:
    for k, (src, dst) in enumerate(moves):
      if os.path.lexists(dst):
        bak = os.path.join(tmp, f"replaced-{k}")
        os.rename(dst, bak)
        backups.append((bak, dst))
      if src is not None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)
        done.append(dst)
  except BaseException:
    for dst in done:
      shutil.rmtree(dst, ignore_errors=True)
    for bak, dst in backups:
      if not os.path.lexists(dst):
        os.rename(bak, dst)
    raise


def prepare(dataset: str, out_dir: str, *, raw_dir: Optional[str] = None,
            indexing: str = "random", kcore: int = 5, seed: int = 0,
            category: Optional[str] = None, build_tfds: bool = True,
            allow_download: bool = True, item_tokens: bool = False) -> dict:
  """Prepares `dataset` under the data root `out_dir`; returns its statistics.

  Args:
    dataset: "ml-100k" | "amazon" | "yelp" | "p5", or a key of schema.DATASETS.
    out_dir: data root; writes <out_dir>/<key>/ and <out_dir>/tfds/p5_<key>/.
    raw_dir: raw files (required except for ML-100K, which is fetched).
    indexing: "random" | "sequential" | "collaborative" | "leaky" (see indexing.py).
    kcore: k of the k-core filter.
    seed: seeds every sample (candidates, negatives, splits, random ids).
    category: Amazon category ("Beauty") or P5 release folder ("beauty").
    build_tfds: also build the TFDS datasets (needed by tasks/).
    allow_download: ML-100K only; False = only raw_dir / cache.
    item_tokens: also make every item id one vocabulary piece (``<i7391>``);
      prompts then write items that way (see schema.py).

  Returns:
    dict with dataset key, indexing, seed and the counts from processing.
  """
  key, source = resolve(dataset, category)
  config = processing.ProcessingConfig(kcore=kcore, seed=seed, indexing=indexing,
                                       item_tokens=item_tokens)
  from p5jax.data import indexing as indexing_lib  # pylint: disable=g-import-not-at-top
  if indexing not in indexing_lib.METHODS:
    raise DataError(f"unknown indexing {indexing!r}; choose from "
                    f"{indexing_lib.METHODS}", field="indexing")
  if source == "amazon" and not category:  # e.g. dataset="amazon_beauty"
    category = AMAZON_FILE_CATEGORIES.get(key)
  raw = read_raw(source, raw_dir, category, allow_download)
  processed = processing.process(raw, config)

  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".prepare-{key}-", dir=out_dir)
  try:
    manifest = _write_dataset(os.path.join(tmp, key), key, source, raw, processed,
                              config)
    tfds_rel = os.path.join("tfds", f"p5_{key}")
    if build_tfds:
      from p5jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
      tfds_builder.build(key, os.path.join(tmp, key), os.path.join(tmp, "tfds"))
    # Without a rebuild an old TFDS copy would disagree with the new files.
    moves = [(os.path.join(tmp, key), schema.dataset_dir(key, out_dir)),
             (os.path.join(tmp, tfds_rel) if build_tfds else None,
              os.path.join(out_dir, tfds_rel))]
    _commit(tmp, out_dir, moves)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {"dataset": key, "source": source, "indexing": indexing, "seed": seed,
          "item_tokens": item_tokens, **manifest["counts"]}


FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "ml-100k", "ml-100k | amazon | yelp | p5")
flags.DEFINE_string("out_dir", None, "Data root to write (see schema.py).")
flags.DEFINE_string("raw_dir", None, "Folder with the raw files.")
flags.DEFINE_enum("indexing", "random",
                  ["random", "sequential", "collaborative", "leaky"],
                  "Item indexing; 'leaky' is P5's original, leaks test items.")
flags.DEFINE_integer("kcore", 5, "k of the k-core filter.")
flags.DEFINE_integer("seed", 0, "Seed for every sampled quantity.")
flags.DEFINE_string("category", None, "Amazon category / P5 release folder name.")
flags.DEFINE_bool("build_tfds", True, "Also build the TFDS datasets.")
flags.DEFINE_bool("item_tokens", False,
                  "Make every item id one vocabulary piece (<i7391>) in prompts.")


def main(argv):
  del argv
  if not FLAGS.out_dir:
    print("error: --out_dir is required", file=sys.stderr)
    return 2
  try:
    stats = prepare(FLAGS.dataset, FLAGS.out_dir, raw_dir=FLAGS.raw_dir,
                    indexing=FLAGS.indexing, kcore=FLAGS.kcore, seed=FLAGS.seed,
                    category=FLAGS.category, build_tfds=FLAGS.build_tfds,
                    item_tokens=FLAGS.item_tokens)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(stats, sort_keys=True))
  return 0


if __name__ == "__main__":
  app.run(main)
