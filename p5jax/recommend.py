r"""Top-k recommendations for one user from a trained run.

  python -m p5jax.recommend --model_dir=/tmp/p5_ml100k --user=23 --topk=10

Reads ``<model_dir>/config.gin`` (written by `p5jax.train`) for the model,
restores the parameters of the latest ``checkpoint_<step>``, renders the
user's whole interaction history with a sequential next-item prompt through
the registered per-prompt SeqIO task (exactly as evaluation renders it), and
runs beam search constrained to the catalog's item trie, excluding items the
user already has (``--include_seen`` keeps them). Prints the recent history
and the top-k items with titles from the prepared ``datamaps.json``.

User ids: ``--user`` is a p5 user id as written in prompts (``23`` or
``user_23``); with ``--raw_id`` it is the dataset's own id (MovieLens
``user_id``, Amazon ``reviewerID``, Yelp ``user_id``), mapped through
``datamaps.json``'s ``user2id``. ``--list_users`` prints valid ids.
An unknown user exits with code 2 and says where valid ids are listed.
"""
import argparse
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from p5jax import gin_utils

EXIT_UNKNOWN_USER = 2
DEFAULT_PROMPT = "2-1"


class RecommendError(Exception):
  """A run directory, dataset or prompt that cannot serve recommendations."""


@dataclasses.dataclass
class Recommendation:
  item_id: str
  title: str
  score: float


@dataclasses.dataclass
class Recommender:
  """A restored model + its dataset's catalog, ready to recommend."""
  model: object
  runner: object
  items: object           # evaluation.ItemIndex
  task_name: str
  dataset: str

  @classmethod
  def from_model_dir(cls, model_dir: str, prompt: str = DEFAULT_PROMPT,
                     data_dir: Optional[str] = None) -> "Recommender":
    from p5jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
    from p5jax import utils  # pylint: disable=g-import-not-at-top
    from p5jax.data import schema  # pylint: disable=g-import-not-at-top
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    config = os.path.join(model_dir, eval_lib.CONFIG_GIN)
    if not os.path.exists(config):
      raise RecommendError(f"{config} does not exist: --model_dir must be a p5jax.train run "
                           "directory (config.gin + checkpoint_<step>/)")
    if data_dir:  # before the model: its vocabulary lives under the data root
      schema.set_data_root(data_dir)
    model, task_module = _model_from_config(config, use_config_data_dir=not data_dir)
    utils.import_module(task_module)
    dataset = getattr(model.output_vocabulary, "dataset", None)
    if not dataset:
      raise RecommendError(f"{config}: the model's vocabulary does not name its dataset "
                           "(expected vocab.get_vocabulary(dataset=...))")
    return cls.from_model(model, model_dir, dataset, prompt)

  @classmethod
  def from_model(cls, model, model_dir: str, dataset: str, prompt: str = DEFAULT_PROMPT,
                 partitioner=None) -> "Recommender":
    """Restores `model`'s latest parameters from `model_dir` (tasks already imported)."""
    from p5jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
    from p5jax import checkpoints, evaluation, partitioning, utils  # pylint: disable=g-import-not-at-top
    task_name = f"p5_{dataset}_sequential_{prompt.replace('-', '_')}"
    utils.get_mixture_or_task(task_name)
    partitioner = partitioner or partitioning.Partitioner()
    params, axes, _ = eval_lib.load_params(
        model, checkpoints.RestoreCheckpointConfig(path=model_dir), partitioner)
    runner = evaluation.ModelRunner(model, params, axes, partitioner)
    items = evaluation.ItemIndex.build(evaluation.Catalog.load(dataset), model.output_vocabulary,
                                       runner.vocab_size)
    return cls(model=model, runner=runner, items=items, task_name=task_name, dataset=dataset)

  @property
  def catalog(self):
    return self.items.catalog

  def resolve_user(self, user: str, raw_id: bool = False) -> Optional[str]:
    """p5 user id of `user`, or None if unknown."""
    user = user.strip()
    if raw_id:
      return self.catalog.user2id.get(user)
    if user.startswith("user_"):
      user = user[len("user_"):]
    return user if user in self.catalog.sequences else None

  def model_batch(self, user_id: str) -> Dict[str, np.ndarray]:
    """The task's prompt for `user_id` (history = all the user's items) as model features."""
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    history = self.catalog.history(user_id, "all")
    task = seqio.get_mixture_or_task(self.task_name)
    example = {"user_id": user_id, "user_name": "", "history": history,
               "target": history[-1], "candidates": [], "negatives": []}
    ds = tf.data.Dataset.from_tensors({
        k: tf.constant(v, tf.string) if v or k not in ("candidates", "negatives")
        else tf.constant([], tf.string) for k, v in example.items()})
    ds = task.preprocess_precache(ds, seed=0)
    ds = task.preprocess_postcache(ds, sequence_length=None, seed=0)
    ex = next(iter(ds.as_numpy_iterator()))
    converter = self.model.FEATURE_CONVERTER_CLS(pack=False)
    lengths = {"inputs": len(ex["inputs"]), "targets": len(ex["targets"])}
    features = next(iter(converter(tf.data.Dataset.from_tensors(
        {k: v for k, v in ex.items() if k in converter.TASK_FEATURES or k.endswith(
            "_whole_word_ids")}), lengths).as_numpy_iterator()))
    return {k: np.asarray(v)[None] for k, v in features.items()}

  def recommend(self, user_id: str, topk: int = 10, include_seen: bool = False,
                beam_size: Optional[int] = None) -> List[Recommendation]:
    batch = self.model_batch(user_id)
    rows = self.runner.partitioner.num_data_shards
    batch = {k: np.repeat(v, rows, axis=0) for k, v in batch.items()}
    exclude = None
    if not include_seen:
      seen = self.items.indices(self.catalog.history(user_id, "all"))
      exclude = np.tile(np.asarray(seen or [-1], np.int32), (rows, 1))
    # Seen items are refused when their last token would be written; an id
    # that prefixes another id can still end a beam at EOS, so search a bit
    # wider than `topk`.
    beam_size = beam_size or max(2 * topk, 20)
    ranked, scores = self.runner.rank_items(batch, self.items.trie,
                                            max(topk, beam_size), 0.0, exclude)
    out = []
    for idx, score in zip(ranked[0], scores[0]):
      if idx >= 0 and len(out) < topk:
        item = self.catalog.item_ids[idx]
        out.append(Recommendation(item, self.catalog.titles.get(item, ""), float(score)))
    return out


def report(rec: Recommender, user_id: str, topk: int = 10, history_items: int = 10,
           include_seen: bool = False, prompt: str = DEFAULT_PROMPT) -> str:
  """The user's recent history and top-`topk` recommendations, with titles."""
  history = rec.catalog.history(user_id, "all")
  title = lambda i: rec.catalog.titles.get(i) or "(no title)"
  lines = [f"user_{user_id} ({len(history)} interactions), most recent last:"]
  lines += [f"  item_{item}\t{title(item)}" for item in history[-history_items:]]
  recs = rec.recommend(user_id, topk, include_seen)
  lines.append(f"top {len(recs)} recommendations ({'' if include_seen else 'unseen items, '}"
               f"prompt {prompt}):")
  lines += [f"  {rank:2d}. item_{r.item_id}\t{title(r.item_id)}\t(log p = {r.score:.3f})"
            for rank, r in enumerate(recs, 1)]
  return "\n".join(lines)


def _model_from_config(config_path: str, use_config_data_dir: bool = True):
  """(model, TASK_MODULE) from a run's config.gin (`gin_utils.model_from_run_config`)."""
  try:
    model, task_module, _ = gin_utils.model_from_run_config(config_path, use_config_data_dir)
  except gin_utils.GinConfigError as e:
    raise RecommendError(str(e)) from None
  return model, task_module


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m p5jax.recommend", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Valid user ids: --list_users, or the keys of user2id (raw ids) / values (p5 "
             "ids) in <data_root>/<dataset>/datamaps.json.")
  parser.add_argument("--model_dir", required=True, help="p5jax.train run directory "
                      "(config.gin + checkpoint_<step>/)")
  parser.add_argument("--user", help="user id: a p5 id as in prompts ('23' or 'user_23'); "
                      "with --raw_id, the dataset's own user id")
  parser.add_argument("--raw_id", action="store_true",
                      help="--user is a raw dataset user id (mapped via datamaps.json user2id)")
  parser.add_argument("--topk", type=int, default=10, help="number of recommendations")
  parser.add_argument("--history", type=int, default=10, help="recent history items to show")
  parser.add_argument("--include_seen", action="store_true",
                      help="allow items the user already interacted with")
  parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                      help="sequential prompt id used to ask for the next item (default 2-1)")
  parser.add_argument("--data_dir", default=None, help="prepared-data root "
                      "(default $P5JAX_DATA_DIR or ~/.cache/p5jax/data)")
  parser.add_argument("--list_users", action="store_true", help="print valid user ids and exit")
  args = parser.parse_args(argv)
  if args.topk < 1:
    parser.error("--topk must be >= 1")
  if not args.user and not args.list_users:
    parser.error("give --user=USER_ID (or --list_users)")

  try:
    rec = Recommender.from_model_dir(args.model_dir, args.prompt, args.data_dir)
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ in ("RecommendError", "CheckpointError", "CheckpointMismatchError",
                            "EvaluationError", "UnknownTaskError", "VocabularyNotFoundError",
                            "DatasetConfigError"):
      print(f"error: {e}", file=sys.stderr)
      return 1
    raise
  from p5jax.data import schema  # pylint: disable=g-import-not-at-top
  maps = os.path.join(schema.dataset_dir(rec.dataset), "datamaps.json")
  if args.list_users:
    raw_of = {v: k for k, v in rec.catalog.user2id.items()}
    print("p5_id\traw_id\tinteractions")
    for uid in sorted(rec.catalog.sequences, key=lambda s: (len(s), s)):
      print(f"{uid}\t{raw_of.get(uid, '')}\t{len(rec.catalog.sequences[uid])}")
    return 0

  user_id = rec.resolve_user(args.user, args.raw_id)
  if user_id is None:
    kind = "raw dataset" if args.raw_id else "p5"
    other = "without --raw_id (p5 ids)" if args.raw_id else "with --raw_id (raw dataset ids)"
    print(f"error: unknown {kind} user id {args.user!r} for dataset {rec.dataset!r} "
          f"({len(rec.catalog.sequences)} users). List valid ids with --list_users, or see "
          f"user2id in {maps}; or try {other}.", file=sys.stderr)
    return EXIT_UNKNOWN_USER

  print(report(rec, user_id, args.topk, args.history, args.include_seen, args.prompt))
  return 0


if __name__ == "__main__":
  # Run the importable module's functions (one gin registry entry), not __main__'s.
  from p5jax import recommend as _recommend_module  # pylint: disable=g-import-not-at-top,import-self
  sys.exit(_recommend_module.main())
