"""Registers the P5 SeqIO tasks: datasets x families x (train | each prompt).

For every dataset key in `schema.DATASETS` and every family it supports:

* ``p5_<dataset>_<family>``: split ``train``; each example rendered with a
  template drawn from the family's *seen* prompts (`tasks.preprocessors`).
* ``p5_<dataset>_<family>_<prompt>``, e.g. ``p5_ml100k_sequential_2_13``:
  splits ``validation`` / ``test``; one fixed prompt (seen or unseen), the
  stored leave-one-out targets, the prompt kind's postprocessor and metrics.

All tasks of a dataset share ``inputs``/``targets`` features over that
dataset's vocabulary (`p5jax.vocab.get_vocabulary`) and carry
``inputs_whole_word_ids`` for `P5EncDecFeatureConverter`. Data is read from
the TFDS datasets under ``schema.tfds_dir()``, resolved when a dataset is
built, so ``schema.set_data_root`` / ``$P5JAX_DATA_DIR`` / ``--data_dir`` may
be set after this module is imported. Re-importing (or calling
`register_tasks` again) replaces the tasks instead of failing.
"""
import os
from typing import Dict, List, Optional, Sequence

import seqio
import tensorflow as tf

from p5jax import metrics
from p5jax import vocab as vocab_lib
from p5jax.data import schema
from tasks import postprocessors
from tasks import preprocessors
from tasks import templates as templates_lib

try:  # Registers the p5_<name> TFDS builders (data layer); optional at import.
  import p5jax.data.tfds_builder  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:  # pragma: no cover - absent only while the data layer is built
  pass

FAMILY_CONFIG = {
    "rating": "reviews", "explanation": "reviews", "review": "reviews",
    "sequential": "sequential", "direct": "sequential",
}
EVAL_SPLITS = ("validation", "test")


def prompt_task_splits(config: str) -> Sequence[str]:
  """Splits of a per-prompt task: review prompts also render the train split.

  Review examples carry their own target, so one fixed prompt renders train
  examples too (`p5jax.embed` exports them for the heads to fit on);
  leave-one-out sequential examples have targets only in validation/test.
  """
  return schema.SPLITS if config == "reviews" else EVAL_SPLITS


class DataNotPreparedError(FileNotFoundError):
  """The TFDS dataset a task reads has not been built under the data root."""


class _DataRootTfdsLoader(seqio.utils.LazyTfdsLoader):
  """LazyTfdsLoader whose data_dir is `schema.tfds_dir()` at call time."""

  @property
  def data_dir(self) -> Optional[str]:
    return self._data_dir_override or schema.tfds_dir()


class P5TfdsDataSource(seqio.TfdsDataSource):
  """TFDS source for ``p5_<dataset>/<config>`` under the current data root."""

  def __init__(self, dataset: str, config: str,
               splits: Sequence[str] = schema.SPLITS):
    self._dataset, self._config = dataset, config
    name = schema.tfds_name(dataset, config)
    super().__init__(tfds_name=name, splits=splits, read_only=True)
    self._tfds_dataset = _DataRootTfdsLoader(
        name, split_map={s: s for s in splits}, read_only=True)

  def _check_prepared(self) -> None:
    path = os.path.join(schema.tfds_dir(), f"p5_{self._dataset}", self._config,
                        schema.TFDS_VERSION)
    if not tf.io.gfile.exists(os.path.join(path, "dataset_info.json")):
      raise DataNotPreparedError(
          f"no prepared TFDS data for {schema.tfds_name(self._dataset, self._config)}"
          f" at {path}. Run `python -m p5jax.data.prepare --dataset="
          f"{self._dataset} --out_dir=<root>` and point the tasks at <root> "
          "(--data_dir, $P5JAX_DATA_DIR or schema.set_data_root).")

  def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None,
                  **kwargs):
    self._check_prepared()
    # The builders are ordered (disable_shuffling=True), which TFDS refuses to
    # read with shuffled files; SeqIO shuffles examples after preprocessing.
    del shuffle
    return super().get_dataset(split=split, shuffle=False, seed=seed,
                               shard_info=shard_info, **kwargs)

  def num_input_examples(self, split: str):
    self._check_prepared()
    return super().num_input_examples(split)

  def list_shards(self, split: str):
    self._check_prepared()
    return super().list_shards(split)


def output_features(dataset: str) -> Dict[str, seqio.Feature]:
  vocabulary = vocab_lib.get_vocabulary(dataset)
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


TOKENIZE = (
    seqio.preprocessors.tokenize,
    seqio.preprocessors.append_eos_after_trim,
    vocab_lib.add_whole_word_ids,
)

_POSTPROCESS = {
    templates_lib.RATING: postprocessors.rating,
    templates_lib.YES_NO: postprocessors.answer,
    templates_lib.LIKE_DISLIKE: postprocessors.answer,
    templates_lib.ITEM: postprocessors.item_id,
    templates_lib.TEXT: postprocessors.text,
}


def metric_fns_for(template: templates_lib.PromptTemplate) -> List:
  """SeqIO metric functions for one prompt, by its answer kind and family."""
  kind = template.kind
  if kind == templates_lib.RATING:
    return [metrics.rating_metrics]
  if kind in (templates_lib.YES_NO, templates_lib.LIKE_DISLIKE):
    return [metrics.accuracy, metrics.yes_no_auc]
  if kind == templates_lib.ITEM:
    return [metrics.ranking_metrics]
  bleu = metrics.bleu2 if template.family == "review" else metrics.bleu4
  return [bleu, metrics.rouge]


def train_task_name(dataset: str, family: str) -> str:
  return f"p5_{dataset}_{family}"


def eval_task_name(dataset: str, family: str, template_id: str) -> str:
  return f"p5_{dataset}_{family}_{template_id.replace('-', '_')}"


def _add_task(name: str, **kwargs) -> seqio.Task:
  seqio.TaskRegistry.remove(name)  # idempotent re-registration
  return seqio.TaskRegistry.add(name, **kwargs)


REGISTERED_TASKS: List[str] = []


def register_tasks(datasets: Optional[Sequence[str]] = None) -> List[str]:
  """(Re-)registers every task of `datasets` (default: all); returns names."""
  names = []
  for dataset in datasets or schema.DATASETS:
    features = output_features(dataset)
    for family in schema.DATASETS[dataset].families:
      config = FAMILY_CONFIG[family]
      seen = templates_lib.dataset_templates(dataset, family, seen=True)
      name = train_task_name(dataset, family)
      _add_task(
          name,
          source=P5TfdsDataSource(dataset, config, splits=("train",)),
          preprocessors=[preprocessors.family_preprocessor(family, seen, True,
                                                        source=dataset),
                         *TOKENIZE],
          output_features=features)
      names.append(name)
      for template in templates_lib.dataset_templates(dataset, family):
        name = eval_task_name(dataset, family, template.id)
        _add_task(
            name,
            source=P5TfdsDataSource(dataset, config, splits=prompt_task_splits(config)),
            preprocessors=[
                preprocessors.family_preprocessor(family, [template], False,
                                                source=dataset),
                *TOKENIZE],
            output_features=features,
            postprocess_fn=_POSTPROCESS[template.kind],
            metric_fns=metric_fns_for(template))
        names.append(name)
  REGISTERED_TASKS[:] = sorted(set(REGISTERED_TASKS) | set(names))
  return names


register_tasks()
