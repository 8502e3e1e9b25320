"""TFDS builders over prepared data, so SeqIO reads it with `TfdsDataSource`.

Importing this module registers one `tfds.core.GeneratorBasedBuilder` per key
of `schema.DATASETS`, named ``p5_<key>`` with configs ``sequential`` and
``reviews`` (features and split semantics: see `schema.py`). The builders read
the prepared jsonl files through TFDS's ``manual_dir`` (the dataset folder), so
nothing is downloaded. `prepare` calls `build`; afterwards::

  seqio.TfdsDataSource(tfds_name=schema.tfds_name("ml100k", "sequential"),
                       tfds_data_dir=schema.tfds_dir(root))

loads it in any process that imported this module (or that only has the built
files: TFDS can also read them without the builder code).
"""
import inspect
import json
import os
from typing import Dict, Iterator, Sequence, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from p5jax.data import schema

CONFIGS = ("sequential", "reviews")

_TEXT = tfds.features.Text
_SEQUENTIAL_FEATURES = dict(
    user_id=_TEXT(), user_name=_TEXT(), history=tfds.features.Sequence(_TEXT()),
    target=_TEXT(), candidates=tfds.features.Sequence(_TEXT()),
    negatives=tfds.features.Sequence(_TEXT()))
_REVIEW_FEATURES = dict(
    user_id=_TEXT(), item_id=_TEXT(), user_name=_TEXT(), item_title=_TEXT(),
    rating=tfds.features.Scalar(dtype=np.float32),
    timestamp=tfds.features.Scalar(dtype=np.int64), review_text=_TEXT(),
    summary=_TEXT(), explanation=_TEXT(), feature=_TEXT())


def sequential_examples(user: dict, split: str) -> dict:
  """One TFDS example of config `sequential` from a sequential.jsonl record."""
  items = user["items"]
  if split == "train":
    history, target, cands = items[:-2], "", []
  elif split == "validation":
    history, target, cands = items[:-2], items[-2], user["candidates"]["validation"]
  else:
    history, target, cands = items[:-1], items[-1], user["candidates"]["test"]
  return dict(user_id=user["user_id"], user_name=user["user_name"],
              history=history, target=target, candidates=cands,
              negatives=user["negatives"])


def _read_jsonl(path: str) -> Iterator[dict]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield json.loads(line)


class P5Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-dataset builders (subclasses only set `name`)."""

  VERSION = tfds.core.Version(schema.TFDS_VERSION)
  RELEASE_NOTES = {schema.TFDS_VERSION: "Leak-free P5 protocol (see schema.py)."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="sequential",
                              description="One example per user, leave-one-out."),
      tfds.core.BuilderConfig(name="reviews",
                              description="One example per rating/review, 80/10/10."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Run `python -m p5jax.data.prepare` first; it builds this dataset with "
      "manual_dir set to the prepared folder <root>/<key>.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS 4.9.10's default touches `importlib_resources`, a package it only
    # declares for Python < 3.9; our builders live in a plain module file.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    feats = (_SEQUENTIAL_FEATURES if self.builder_config.name == "sequential"
             else _REVIEW_FEATURES)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(feats), disable_shuffling=True,
        homepage="https://arxiv.org/abs/2203.13366")

  def _split_generators(self, dl_manager):
    folder = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(folder, split) for split in schema.SPLITS}

  def _generate_examples(self, folder: str, split: str
                         ) -> Iterator[Tuple[str, Dict]]:
    if self.builder_config.name == "sequential":
      for user in _read_jsonl(os.path.join(folder, "sequential.jsonl")):
        yield user["user_id"], sequential_examples(user, split)
    else:
      keys = list(_REVIEW_FEATURES)
      for n, r in enumerate(_read_jsonl(os.path.join(folder, "reviews.jsonl"))):
        if r["split"] == split:
          yield str(n), {k: r[k] for k in keys}


def _registered(name: str) -> bool:
  try:
    tfds.builder_cls(name)
    return True
  except Exception:  # pylint: disable=broad-except  # DatasetNotFoundError et al.
    return False


BUILDERS: Dict[str, type] = {}
for _key in schema.DATASETS:
  _name = f"p5_{_key}"
  if _registered(_name):  # module reloaded: reuse the registered class
    BUILDERS[_key] = tfds.builder_cls(_name)
  else:
    BUILDERS[_key] = type(f"P5_{_key}", (P5Builder,), {
        "name": _name, "__module__": __name__,
        "__doc__": f"P5 prepared data for dataset key {_key!r}."})


def build(key: str, dataset_dir: str, tfds_data_dir: str,
          configs: Sequence[str] = CONFIGS) -> None:
  """Builds (or rebuilds) `p5_<key>` from the prepared files in `dataset_dir`."""
  tfds.disable_progress_bar()
  dl_config = tfds.download.DownloadConfig(
      manual_dir=dataset_dir, try_download_gcs=False,
      compute_stats=tfds.download.ComputeStatsMode.SKIP,
      download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
  for config in configs:
    builder = BUILDERS[key](config=config, data_dir=tfds_data_dir)
    builder.download_and_prepare(download_config=dl_config)
