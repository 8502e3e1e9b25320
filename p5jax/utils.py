"""Dataset configs and SeqIO input pipelines for training/eval (T5X `utils.py` names).

`DatasetConfig` says *what* to read (task/mixture, split, lengths, batch size,
seed); `get_dataset` turns it into a per-host `tf.data.Dataset` of model
feature batches through `seqio.get_dataset` and a feature converter, sharded
across hosts with `seqio.ShardInfo` (see `partitioning.Partitioner.get_data_layout`).

The checkpoint configs live in `p5jax.checkpoints` and are re-exported here so
gin files can say ``utils.CheckpointConfig`` as in T5X.
"""
import dataclasses
import difflib
import importlib
from typing import Iterator, Mapping, Optional, Type

import numpy as np
import seqio
import tensorflow as tf

from p5jax.checkpoints import CheckpointConfig  # pylint: disable=unused-import
from p5jax.checkpoints import RestoreCheckpointConfig  # pylint: disable=unused-import
from p5jax.checkpoints import SaveCheckpointConfig  # pylint: disable=unused-import


class UnknownTaskError(ValueError):
  """A mixture/task name that is not registered with SeqIO."""


class DatasetConfigError(ValueError):
  """A `DatasetConfig` that cannot be turned into a dataset."""


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Configuration of one input pipeline (T5X `utils.DatasetConfig`).

  Attributes:
    mixture_or_task_name: registered SeqIO task or mixture.
    task_feature_lengths: e.g. ``{"inputs": 512, "targets": 64}``.
    split: dataset split ("train", "validation", "test").
    batch_size: *global* batch size (each host reads its share).
    shuffle: shuffle examples (with `seed`, so the order is reproducible).
    seed: shuffle/preprocessing seed; required for exact resume.
    use_cached: read a SeqIO cache instead of preprocessing on the fly.
    pack: pack several examples per row (segment ids/positions are added).
    use_custom_packing_ops: SeqIO's custom packing ops.
    module: module to import first so the task is registered (e.g.
      ``"tasks.tasks"``).
    use_memory_cache: cache small eval datasets in memory.
    trim_output_features: trim features longer than the lengths.
  """
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str
  batch_size: int
  shuffle: bool
  seed: Optional[int]
  use_cached: bool = False
  pack: bool = False
  use_custom_packing_ops: bool = False
  module: Optional[str] = None
  use_memory_cache: bool = True
  trim_output_features: bool = True


def import_module(module: Optional[str]) -> None:
  if not module:
    return
  try:
    importlib.import_module(module)
  except ImportError as e:
    raise DatasetConfigError(f"DatasetConfig.module {module!r} cannot be imported: {e}") from e


def get_mixture_or_task(name: str):
  """`seqio.get_mixture_or_task` with a clear error and close-match hints."""
  known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if name not in known:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownTaskError(
        f"SeqIO task or mixture {name!r} is not registered ({len(known)} registered; is the "
        f"module that registers it imported, e.g. DatasetConfig.module='tasks.tasks'?).{hint}")
  return seqio.get_mixture_or_task(name)


def feature_converter_cls_for(model) -> Type[seqio.FeatureConverter]:
  """The model's feature converter (T5X `FEATURE_CONVERTER_CLS`), else EncDec."""
  for attr in ("FEATURE_CONVERTER_CLS", "feature_converter_cls", "_feature_converter_cls"):
    cls = getattr(model, attr, None)
    if cls is not None:
      return cls
  return seqio.EncDecFeatureConverter


def get_dataset(cfg: DatasetConfig, shard_id: int, num_shards: int,
                feature_converter_cls: Type[seqio.FeatureConverter],
                num_epochs: Optional[int] = None,
                continue_from_batch: int = 0,
                drop_remainder: bool = True) -> tf.data.Dataset:
  """Per-host dataset of batches for `cfg`.

  Args:
    cfg: the dataset config.
    shard_id, num_shards: this host's data shard (`DataLayout`).
    feature_converter_cls: SeqIO feature converter class.
    num_epochs: None repeats forever (training).
    continue_from_batch: skip this many batches (exact resume: the pipeline is
      deterministic given `cfg.seed`).
    drop_remainder: False pads the last batch with all-zero rows (zero loss
      weight) so evaluation keeps static shapes and sees every example.

  Returns:
    `tf.data.Dataset` of dicts of [batch_size // num_shards, ...] tensors.
  """
  import_module(cfg.module)
  get_mixture_or_task(cfg.mixture_or_task_name)
  if cfg.batch_size % num_shards:
    raise DatasetConfigError(
        f"batch_size {cfg.batch_size} of {cfg.mixture_or_task_name!r} is not divisible by "
        f"{num_shards} data shards")
  if cfg.shuffle and cfg.seed is None:
    raise DatasetConfigError(
        f"DatasetConfig for {cfg.mixture_or_task_name!r} shuffles without a seed: the data "
        "order (and resume) would not be reproducible; set DatasetConfig.seed")
  per_host = cfg.batch_size // num_shards
  converter = feature_converter_cls(pack=cfg.pack,
                                    use_custom_packing_ops=cfg.use_custom_packing_ops)
  try:
    ds = _seqio_dataset(cfg, converter, num_epochs, shard_id, num_shards)
  except ValueError as e:  # e.g. "No datasets have a 'validation' split"
    raise DatasetConfigError(
        f"cannot build {cfg.mixture_or_task_name!r} split {cfg.split!r} with lengths "
        f"{dict(cfg.task_feature_lengths)}: {e}") from e
  if drop_remainder:
    ds = ds.batch(per_host, drop_remainder=True)
  else:
    ds = ds.batch(per_host, drop_remainder=False).map(
        lambda b: {k: _pad_rows(v, per_host) for k, v in b.items()})
  if continue_from_batch:
    ds = ds.skip(continue_from_batch)
  return ds.prefetch(tf.data.AUTOTUNE)


def _seqio_dataset(cfg: DatasetConfig, converter, num_epochs, shard_id, num_shards):
  return seqio.get_dataset(
      cfg.mixture_or_task_name,
      task_feature_lengths=dict(cfg.task_feature_lengths),
      feature_converter=converter,
      dataset_split=cfg.split,
      use_cached=cfg.use_cached,
      shuffle=cfg.shuffle,
      num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
      verbose=False,
      seed=cfg.seed,
      trim_output_features=cfg.trim_output_features)


def _pad_rows(x: tf.Tensor, rows: int) -> tf.Tensor:
  pad = rows - tf.shape(x)[0]
  paddings = [[0, pad]] + [[0, 0]] * (len(x.shape) - 1)
  return tf.pad(x, paddings)


def as_numpy_iterator(ds: tf.data.Dataset) -> Iterator[Mapping[str, np.ndarray]]:
  return iter(ds.as_numpy_iterator())
