"""Registers the P5 SeqIO mixtures of each dataset.

* ``p5_<dataset>_pretrain``: the ``p5_<dataset>_<family>`` training tasks of
  every family the dataset has (seen prompts only). Rates are read at
  dataset-build time from gin: ``pretrain_rate.family_rates = {"rating": 1.0,
  "sequential": 5.0}`` (missing families: ``default_rate``, 1.0).
* ``p5_<dataset>_<family>_eval``: every per-prompt task of the family, seen and
  unseen (validation / test).
* ``p5_<dataset>_eval``: every per-prompt task of every family of the dataset
  (what the main job evaluates).
* ``p5_<dataset>_unseen``: the per-prompt tasks of the unseen prompts (1-10,
  2-13, 3-12, 4-4, 5-8) available on the dataset: zero-shot evaluation.

`P5Mixture` keeps ``inputs_whole_word_ids`` through SeqIO's mixture feature
filter (which otherwise keeps only ``inputs``/``targets``).
"""
from typing import List, Mapping, Optional, Sequence

import gin
import seqio

from p5jax import feature_converters
from p5jax.data import schema
from tasks import tasks as p5_tasks
from tasks import templates as templates_lib

KEEP_FEATURES = (feature_converters.WHOLE_WORD_TASK_FEATURE,)


class P5Mixture(seqio.Mixture):
  """`seqio.Mixture` that also passes the whole-word ids through."""

  def get_dataset(self, *args, passthrough_features: Optional[Sequence[str]] = None,
                  **kwargs):
    keep = list(passthrough_features or ()) + [
        f for f in KEEP_FEATURES if f not in (passthrough_features or ())]
    return super().get_dataset(*args, passthrough_features=keep, **kwargs)


@gin.configurable
def pretrain_rate(task: seqio.Task,
                  family_rates: Optional[Mapping[str, float]] = None,
                  default_rate: float = 1.0) -> float:
  """Mixing rate of a ``p5_<dataset>_<family>`` task in a pretrain mixture."""
  family = task.name.rsplit("_", 1)[-1]
  return float((family_rates or {}).get(family, default_rate))


def _add_mixture(name: str, tasks) -> seqio.Mixture:
  seqio.MixtureRegistry.remove(name)  # idempotent re-registration
  return seqio.MixtureRegistry.add(name, tasks, default_rate=1.0,
                                   mixture_cls=P5Mixture)


def pretrain_mixture_name(dataset: str) -> str:
  return f"p5_{dataset}_pretrain"


def family_eval_mixture_name(dataset: str, family: str) -> str:
  return f"p5_{dataset}_{family}_eval"


def all_eval_mixture_name(dataset: str) -> str:
  return f"p5_{dataset}_eval"


def unseen_mixture_name(dataset: str) -> str:
  return f"p5_{dataset}_unseen"


REGISTERED_MIXTURES: List[str] = []


def register_mixtures(datasets: Optional[Sequence[str]] = None) -> List[str]:
  """(Re-)registers every mixture of `datasets` (default: all); returns names."""
  names = []
  for dataset in datasets or schema.DATASETS:
    families = schema.DATASETS[dataset].families
    name = pretrain_mixture_name(dataset)
    _add_mixture(name, [(p5_tasks.train_task_name(dataset, f), pretrain_rate)
                        for f in families])
    names.append(name)
    unseen, every = [], []
    for family in families:
      prompts = templates_lib.family_templates(family)
      name = family_eval_mixture_name(dataset, family)
      _add_mixture(name, [p5_tasks.eval_task_name(dataset, family, t.id)
                          for t in prompts])
      names.append(name)
      every += [p5_tasks.eval_task_name(dataset, family, t.id) for t in prompts]
      unseen += [p5_tasks.eval_task_name(dataset, family, t.id)
                 for t in prompts if not t.seen]
    for name, members in ((all_eval_mixture_name(dataset), every),
                          (unseen_mixture_name(dataset), unseen)):
      _add_mixture(name, members)
      names.append(name)
  REGISTERED_MIXTURES[:] = sorted(set(REGISTERED_MIXTURES) | set(names))
  return names


register_mixtures()
