"""Per-prompt evaluation of a P5 model through `seqio.Evaluator`.

Every per-prompt SeqIO eval task (``p5_<dataset>_<family>_<prompt>``) is
evaluated by its own `seqio.Evaluator` (so each prompt gets its own padded
lengths) with model functions chosen by what the prompt asks for:

=================  ============================================  =============
prompt kind        model computation (jitted, static batch)       metrics
=================  ============================================  =============
next item          beam search constrained to the item trie of    HR@1/5/10,
(2-1..2-6, 2-13)   the whole catalog, beam = `EvalConfig.beam_    NDCG@5/10
                   size` (>= largest k), optionally excluding
                   the user's history -> ranked item list
candidate pick     log-likelihood of every candidate id (encoder  HR@1/5/10,
(2-7..2-10,        runs once per example, decoder teacher-forced  NDCG@5/10
5-5..5-8)          over all candidates, = `score_batch`) -> rank
yes/no, like/      log-likelihood of both answers -> argmax and   accuracy, AUC
dislike            P(positive) normalised over the two
rating             short beam / greedy decode                     RMSE, MAE
explanation,       beam search (`text_beam_size`)                 BLEU, ROUGE
review text
=================  ============================================  =============

Ranked lists go to SeqIO as ``[K, L]`` token arrays per example (best first);
SeqIO decodes each row and the task's postprocessor/metrics turn them into ids
and HR/NDCG. SeqIO stacks all predictions with ``np.array``, so every example's
array has the same shape (padding rows decode to "").

`ModelRunner` holds the compiled functions (`Partitioner.partition`, params
sharded by their logical axes); `Catalog` holds the prepared dataset's items,
titles and histories and builds the item trie once per dataset.
`write_results` writes ``results.md`` / ``results.json`` / ``results.png``.
"""
import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow_datasets as tfds

from p5jax import decoding
from p5jax import fileio
from p5jax import partitioning
from p5jax.data import schema

PyTree = Any

# P5's prompt numbering (DESIGN.md). The library does not import `tasks/`, so
# these facts are configuration (gin: `EvalConfig.candidate_prompts`).
P5_CANDIDATE_PROMPTS = ("2-7", "2-8", "2-9", "2-10", "5-5", "5-6", "5-7", "5-8")
P5_UNSEEN_PROMPTS = ("1-10", "2-13", "3-12", "4-4", "5-8")
# Metric columns in the order the results table shows them.
METRIC_ORDER = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "accuracy", "auc",
                "rmse", "mae", "invalid", "bleu4", "bleu2", "rouge1", "rouge2", "rougeL")
_TASK_NAME = re.compile(
    r"^p5_(?P<dataset>.+)_(?P<family>rating|sequential|explanation|review|direct)"
    r"_(?P<major>\d+)_(?P<minor>\d+)$")

ITEM, CANDIDATES, BINARY, RATING, TEXT = "item", "candidates", "binary", "rating", "text"


class EvaluationError(ValueError):
  """An eval task, catalog file or configuration that cannot be evaluated."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How prompts are decoded and scored (bind fields with gin).

  Attributes:
    beam_size: beams of full-catalog item ranking; must be >= the largest k of
      the metrics (10) -- P5 protocol uses 20.
    alpha: length penalty of item beams; 0 ranks items by P(id | prompt).
    exclude_history: never recommend items of the user's history (the split's
      leave-one-out history from the prepared data).
    batch_size: examples per compiled call (the last batch is padded).
    candidate_batch_size: examples per call when scoring candidate lists
      (rows = examples x candidates).
    rating_beam_size: beams for rating prompts (1 = greedy).
    text_beam_size: beams for explanation / review sentences.
    text_alpha: length penalty for text beams (T5X default 0.6).
    max_examples: evaluate only the first N examples of each task (None = all).
    candidate_prompts / unseen_prompts: P5 prompt ids with candidate lists /
      held out from training.
  """
  beam_size: int = 20
  alpha: float = 0.0
  exclude_history: bool = False
  batch_size: int = 16
  candidate_batch_size: int = 4
  rating_beam_size: int = 1
  text_beam_size: int = 4
  text_alpha: float = 0.6
  max_examples: Optional[int] = None
  candidate_prompts: Tuple[str, ...] = P5_CANDIDATE_PROMPTS
  unseen_prompts: Tuple[str, ...] = P5_UNSEEN_PROMPTS

  def __post_init__(self):
    if self.beam_size < 10:
      raise EvaluationError(f"EvalConfig.beam_size={self.beam_size}: HR/NDCG@10 need at "
                            "least 10 ranked items")
    for name in ("batch_size", "candidate_batch_size", "rating_beam_size", "text_beam_size"):
      if getattr(self, name) < 1:
        raise EvaluationError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")


# ------------------------------------------------------------------- catalog


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise EvaluationError(f"{path} does not exist; prepare the dataset first "
                          "(python -m p5jax.data.prepare) or set the data root") from None
  except json.JSONDecodeError as e:
    raise EvaluationError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None


@dataclasses.dataclass
class Catalog:
  """A prepared dataset's items, titles and user histories.

  Attributes:
    dataset: dataset key (``ml100k``).
    item_ids: p5 item ids; item index i (as in the trie) is ``item_ids[i]``.
    titles: p5 item id -> title ("" when unknown).
    sequences: p5 user id -> chronological p5 item ids (all splits).
    user2id: raw dataset user id -> p5 user id.
    items_as_tokens: items are written as item tokens ("<i7391>", schema.py).
  """
  dataset: str
  item_ids: List[str]
  titles: Dict[str, str]
  sequences: Dict[str, List[str]]
  user2id: Dict[str, str]
  items_as_tokens: bool = False

  @classmethod
  def load(cls, dataset: str, root: Optional[str] = None) -> "Catalog":
    folder = schema.dataset_dir(dataset, root)
    maps_path = os.path.join(folder, "datamaps.json")
    maps = _read_json(maps_path)
    for field in ("item2id", "user2id"):
      if not isinstance(maps.get(field), dict):
        raise EvaluationError(f"{maps_path}: field {field!r} is missing or not an object")
    item_ids = sorted(set(maps["item2id"].values()), key=lambda s: (len(s), s))
    sequences = {}
    seq_path = os.path.join(folder, "sequential.jsonl")
    try:
      with open(seq_path) as f:
        for lineno, line in enumerate(f, 1):
          try:
            row = json.loads(line)
            sequences[str(row["user_id"])] = [str(i) for i in row["items"]]
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EvaluationError(f"{seq_path}, line {lineno}: bad user record ({e!r}); "
                                  "needs 'user_id' and 'items'") from None
    except FileNotFoundError:
      raise EvaluationError(f"{seq_path} does not exist; prepare the dataset first") from None
    return cls(dataset=dataset, item_ids=item_ids,
               titles={str(k): str(v) for k, v in (maps.get("item_titles") or {}).items()},
               sequences=sequences,
               user2id={str(k): str(v) for k, v in maps["user2id"].items()},
               items_as_tokens=schema.uses_item_tokens(dataset, root))

  @property
  def index(self) -> Dict[str, int]:
    if not hasattr(self, "_index"):
      self._index = {item: i for i, item in enumerate(self.item_ids)}  # pylint: disable=attribute-defined-outside-init
    return self._index

  def history(self, user_id: str, split: str) -> List[str]:
    """Items before the split's leave-one-out target (all items for "all")."""
    items = self.sequences.get(user_id, [])
    cut = {"test": 1, "validation": 2, "train": 2, "all": 0}[split]
    return items[:len(items) - cut] if cut else list(items)

  def item_tokens(self, vocabulary: seqio.Vocabulary) -> List[List[int]]:
    """Token ids of every item as a target string (without EOS)."""
    text = schema.item_token if self.items_as_tokens else str
    return [list(vocabulary.encode(text(item))) for item in self.item_ids]


@dataclasses.dataclass
class ItemIndex:
  """Catalog + vocabulary -> item trie and padded target rows (built once)."""
  catalog: Catalog
  trie: decoding.ItemTrie
  targets_NxT: np.ndarray  # int32 item tokens + EOS, 0-padded

  @classmethod
  def build(cls, catalog: Catalog, vocabulary: seqio.Vocabulary,
            vocab_size: int) -> "ItemIndex":
    """`vocab_size` is the model's logits width (>= vocabulary.vocab_size)."""
    seqs = catalog.item_tokens(vocabulary)
    try:
      trie = decoding.build_item_trie(seqs, vocab_size, vocabulary.eos_id)
    except decoding.DecodingError as e:
      raise EvaluationError(f"item trie of {catalog.dataset!r}: {e}") from None
    width = max(len(s) for s in seqs) + 1
    targets = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
      targets[i, :len(s)] = s
      targets[i, len(s)] = vocabulary.eos_id
    return cls(catalog=catalog, trie=trie, targets_NxT=targets)

  def indices(self, item_ids: Sequence[Any]) -> List[int]:
    out = []
    for item in item_ids:
      item = item.decode() if isinstance(item, bytes) else str(item)
      out.append(self.catalog.index.get(item, -1))
    return out

  def rows(self, indices_BxK: np.ndarray) -> np.ndarray:
    """Item indices [..., K] (-1 = none) -> target tokens [..., K, T] (0 rows for -1)."""
    idx = np.asarray(indices_BxK)
    rows = self.targets_NxT[np.maximum(idx, 0)]
    return np.where((idx >= 0)[..., None], rows, 0).astype(np.int32)


# -------------------------------------------------------------- model runner


def _shift_right(targets_NxT: jnp.ndarray) -> jnp.ndarray:
  return jnp.pad(targets_NxT[:, :-1], ((0, 0), (1, 0)))


class ModelRunner:
  """Compiled inference functions of one model + parameters.

  Every function is built once with `Partitioner.partition` (parameters
  sharded by their logical axes, batches over ``data``) and compiled once per
  input shape; callers pad batches to a static size.
  """

  def __init__(self, model, params: PyTree, params_axes: PyTree,
               partitioner: partitioning.Partitioner):
    self.model = model
    self.params = params
    self.params_axes = params_axes
    self.partitioner = partitioner
    self._fns: Dict[Any, Callable] = {}
    data = partitioner.data_partition_spec
    self._data = data

  @property
  def vocab_size(self) -> int:
    return int(self.model.module.config.vocab_size)

  def _partitioned(self, key, fn, in_axes):
    if key not in self._fns:
      self._fns[key] = self.partitioner.partition(
          fn, in_axis_resources=in_axes, out_axis_resources=None)
    return self._fns[key]

  def _global(self, tree):
    return self.partitioner.host_local_to_global(tree)

  @staticmethod
  def _encoder_features(batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k: batch[k] for k in ("encoder_input_tokens", "encoder_whole_word_ids") if k in batch}

  def rank_items(self, batch: Mapping[str, np.ndarray], trie: decoding.ItemTrie,
                 num_decodes: int, alpha: float = 0.0,
                 exclude_BxX: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Constrained beam search over the catalog.

    Args:
      batch: model features with ``encoder_input_tokens`` [B, S].
      trie: the catalog's `decoding.ItemTrie`.
      num_decodes: beams = length of the ranked list.
      alpha: length penalty.
      exclude_BxX: item indices never returned (-1 padded), or None.

    Returns:
      items [B, K] int32 item indices best first (-1 where fewer than K valid
      items exist) and their scores [B, K].
    """
    model = self.model
    features = self._encoder_features(batch)
    rows = features["encoder_input_tokens"].shape[0]
    features["decoder_input_tokens"] = np.zeros((rows, trie.max_depth), np.int32)
    use_exclude = exclude_BxX is not None

    def fn(params, feats, trie, exclude):
      decoder_params = {"constraint": trie, "alpha": alpha}
      if use_exclude:
        decoder_params["exclude"] = exclude
      decodes, aux = model.predict_batch_with_aux(
          params, feats, decoder_params=decoder_params, return_all_decodes=True,
          num_decodes=num_decodes)
      # T5X order is ascending (best last): flip to best first.
      decodes_BxKxL = decodes[:, ::-1]
      scores_BxK = aux["scores"][:, ::-1]
      items_BxK = decoding.item_indices(trie, decodes_BxKxL)
      items_BxK = jnp.where(scores_BxK > decoding.NEG_INF / 2, items_BxK, -1)
      return items_BxK, scores_BxK

    call = self._partitioned(("rank", num_decodes, alpha, use_exclude), fn,
                             (self.params_axes, self._data, None, self._data))
    exclude = (exclude_BxX if use_exclude else np.zeros((rows, 1), np.int32))
    items, scores = call(self.params, self._global(features), trie,
                         self._global(np.asarray(exclude, np.int32)))
    return np.asarray(jax.device_get(items)), np.asarray(jax.device_get(scores))

  def score_options(self, batch: Mapping[str, np.ndarray],
                    options_BxCxT: np.ndarray) -> np.ndarray:
    """Log-likelihood of each example's C target options [B, C] (float32).

    Equals ``model.score_batch`` on a batch with every (example, option) row,
    but the encoder runs once per example and so do the cross-attention
    keys/values: the options are teacher-forced through the cached decoder
    (T steps of B * C rows sharing each example's cached encoder keys/values,
    as beams do), instead of projecting a C-times repeated encoder output.
    """
    model = self.model

    def fn(params, feats, options):
      b, c, t = options.shape
      inputs_BxS = feats["encoder_input_tokens"]
      encoded_BxSxD = model.module.apply(
          {"params": params}, inputs_BxS, None, None,
          feats.get("encoder_whole_word_ids"), enable_dropout=False, method="encode")
      cache = model._init_cache(params, encoded_BxSxD, inputs_BxS, (b, t))  # pylint: disable=protected-access
      cache = decoding.cache_map(lambda x: decoding.flat_batch_beam_expand(x, c), cache)
      targets_NxT = options.reshape(b * c, t)
      shifted_NxT = _shift_right(targets_NxT)
      total_N = jnp.zeros((b * c,), jnp.float32)
      for i in range(t):  # T is a handful of item tokens: unrolled
        step = shifted_NxT[:, i:i + 1]
        logits_Nx1xV, new_vars = model.module.apply(
            {"params": params, "cache": cache}, None, inputs_BxS, step, step,
            enable_dropout=False, decode=True, max_decode_length=t,
            mutable=["cache"], method="decode")
        cache = new_vars["cache"]
        log_probs_NxV = jax.nn.log_softmax(logits_Nx1xV[:, 0].astype(jnp.float32), axis=-1)
        token = targets_NxT[:, i]
        lp_N = jnp.take_along_axis(log_probs_NxV, token[:, None], axis=-1)[:, 0]
        total_N = total_N + jnp.where(token > 0, lp_N, 0.0)
      return total_N.reshape(b, c)

    call = self._partitioned(("score_options",), fn,
                             (self.params_axes, self._data, self._data))
    out = call(self.params, self._global(self._encoder_features(batch)),
               self._global(np.asarray(options_BxCxT, np.int32)))
    return np.asarray(jax.device_get(out))

  def score_batch(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """``model.score_batch`` (targets' log-likelihood [B]), compiled."""
    call = self._partitioned(("score_batch",), self.model.score_batch,
                             (self.params_axes, self._data))
    return np.asarray(jax.device_get(call(self.params, self._global(dict(batch)))))

  def decode(self, batch: Mapping[str, np.ndarray], num_decodes: int,
             alpha: float) -> Tuple[np.ndarray, np.ndarray]:
    """Unconstrained beam search: best sequence [B, L] and its score [B].

    L = width of ``decoder_input_tokens`` in `batch` (the task's target length).
    """
    model = self.model
    features = self._encoder_features(batch)
    features["decoder_input_tokens"] = np.zeros_like(batch["decoder_input_tokens"])

    def fn(params, feats):
      decodes, aux = model.predict_batch_with_aux(
          params, feats, decoder_params={"alpha": alpha}, num_decodes=num_decodes)
      return decodes, aux["scores"]

    call = self._partitioned(("decode", num_decodes, alpha), fn,
                             (self.params_axes, self._data))
    tokens, scores = call(self.params, self._global(features))
    return np.asarray(jax.device_get(tokens)), np.asarray(jax.device_get(scores))


def _init_shapes(model) -> Dict[str, Tuple[int, int]]:
  # Parameter shapes do not depend on lengths (relative attention): tiny inputs do.
  shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 4)}
  converter = getattr(model, "FEATURE_CONVERTER_CLS", None)
  if "encoder_whole_word_ids" in getattr(converter, "MODEL_FEATURES", {}):
    shapes["encoder_whole_word_ids"] = (1, 8)
  return shapes


def init_params_axes(model, partitioner: partitioning.Partitioner,
                     input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None):
  """(abstract params with shardings, params mesh axes) of `model` (restore target)."""
  shapes = input_shapes or _init_shapes(model)
  boxed = jax.eval_shape(lambda rng: model.get_initial_variables(rng, shapes)["params"],
                         jax.random.key(0))
  axes = partitioner.params_mesh_axes(boxed)
  shardings = partitioner.to_shardings(axes)
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      partitioning.unbox(boxed), shardings)
  return abstract, axes


def random_params(model, partitioner: partitioning.Partitioner, seed: int = 0):
  """Randomly initialised, sharded parameters and their mesh axes (tests, benchmarks)."""
  _, axes = init_params_axes(model, partitioner)
  shapes = _init_shapes(model)
  init = partitioner.partition(
      lambda rng: partitioning.unbox(model.get_initial_variables(rng, shapes)["params"]),
      in_axis_resources=None, out_axis_resources=axes)
  return init(jax.random.key(seed)), axes


# ------------------------------------------------------------ task analysis


@dataclasses.dataclass(frozen=True)
class PromptInfo:
  """What a per-prompt task name and metrics say about it."""
  task: str
  dataset: str
  family: str
  prompt: str  # P5 id, "2-13"
  seen: bool
  kind: str    # ITEM | CANDIDATES | BINARY | RATING | TEXT


def prompt_info(task: seqio.Task, config: EvalConfig) -> PromptInfo:
  """Parses ``p5_<dataset>_<family>_<a>_<b>`` and classifies the prompt."""
  m = _TASK_NAME.match(task.name)
  if not m:
    raise EvaluationError(
        f"task {task.name!r} is not a per-prompt P5 eval task (p5_<dataset>_<family>_<a>_<b>); "
        "evaluate a mixture such as p5_ml100k_sequential_eval or p5_ml100k_unseen")
  prompt = f"{m['major']}-{m['minor']}"
  names = {getattr(f, "__name__", getattr(getattr(f, "func", None), "__name__", ""))
           for f in task.metric_fns}
  if "ranking_metrics" in names:
    kind = CANDIDATES if prompt in config.candidate_prompts else ITEM
  elif "rating_metrics" in names:
    kind = RATING
  elif "accuracy" in names or "yes_no_auc" in names:
    kind = BINARY
  elif names & {"bleu", "rouge"}:
    kind = TEXT
  else:
    raise EvaluationError(f"task {task.name!r}: cannot tell the prompt kind from its metric "
                          f"functions {sorted(names)}")
  return PromptInfo(task=task.name, dataset=m["dataset"], family=m["family"], prompt=prompt,
                    seen=prompt not in config.unseen_prompts, kind=kind)


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


_BINARY_OPTIONS = (("yes", "no"), ("like", "dislike"))


def _binary_options(examples: Sequence[Mapping[str, Any]]) -> Tuple[str, str]:
  targets = {_text(ex.get("targets_pretokenized", b"")).strip().lower() for ex in examples}
  for options in _BINARY_OPTIONS:
    if targets <= set(options):
      return options
  raise EvaluationError(f"binary prompt targets {sorted(targets)[:5]} are neither yes/no "
                        "nor like/dislike")


# ----------------------------------------------------------------- evaluation


@dataclasses.dataclass
class TaskResult:
  """Outcome of one prompt: the results row and the per-example outputs."""
  info: PromptInfo
  row: Dict[str, Any]
  metrics: Dict[str, float]
  inputs: List[str]
  targets: List[str]
  predictions: List[Any]   # postprocessed: ranked id lists, answers, ratings, text
  scores: List[Any]        # per-example scores (lists for ranked outputs)


def _pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> Dict[str, np.ndarray]:
  return {k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


# Encoder lengths are padded up to a multiple of this, so prompts of similar
# length (and every batch of one prompt) reuse one compiled function instead
# of compiling per task: on CPU a compile costs more than evaluating a prompt.
ENCODER_LENGTH_BUCKET = 64


def _bucket(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def _pad_encoder_length(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Zero-pads ``encoder_*`` features [B, S] to S rounded up to the bucket."""
  out = dict(batch)
  for k, v in batch.items():
    if k.startswith("encoder_") and v.ndim == 2:
      width = _bucket(v.shape[1], ENCODER_LENGTH_BUCKET)
      out[k] = np.pad(v, [(0, 0), (0, width - v.shape[1])])
  return out


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << max(n - 1, 0).bit_length())


def _batches(ds, batch_size: int):
  """(indices, batch padded to batch_size rows and bucketed encoder length, n real rows)."""
  for indices, features in ds.batch(batch_size).as_numpy_iterator():
    yield indices, _pad_encoder_length(_pad_rows(features, batch_size)), len(indices)


class PromptEvaluator:
  """Evaluates per-prompt SeqIO tasks with one `ModelRunner` (see module doc)."""

  def __init__(self, runner: ModelRunner, config: EvalConfig = EvalConfig(),
               feature_converter_cls=None, data_root: Optional[str] = None,
               evaluator_cls=seqio.Evaluator):
    self.runner = runner
    self.config = config
    self._converter_cls = feature_converter_cls or getattr(
        runner.model, "FEATURE_CONVERTER_CLS", seqio.EncDecFeatureConverter)
    self._data_root = data_root
    self._evaluator_cls = evaluator_cls
    self._items: Dict[str, ItemIndex] = {}
    # Batches are split over the mesh's `data` axis: round sizes up to fit it.
    shards = runner.partitioner.num_data_shards
    fit = lambda n: -(-n // shards) * shards
    self.config = dataclasses.replace(config, batch_size=fit(config.batch_size),
                                      candidate_batch_size=fit(config.candidate_batch_size))

  def item_index(self, dataset: str) -> ItemIndex:
    """The dataset's catalog and trie (built on first use, then cached)."""
    if dataset not in self._items:
      t0 = time.time()
      catalog = Catalog.load(dataset, self._data_root)
      self._items[dataset] = ItemIndex.build(
          catalog, self.runner.model.output_vocabulary, self.runner.vocab_size)
      logging.info("item trie of %s: %d items, %d nodes, %.1fs", dataset,
                   len(catalog.item_ids), self._items[dataset].trie.num_nodes, time.time() - t0)
    return self._items[dataset]

  # -- per-kind model functions: enumerated model ds -> [(index, tokens)], aux

  def _rank_fn(self, info, examples, split):
    cfg, items = self.config, self.item_index(info.dataset)

    def predict(ds, model_feature_shapes=None):
      del model_feature_shapes
      out, scores = [], []
      for indices, batch, n in _batches(ds, cfg.batch_size):
        exclude = None
        if cfg.exclude_history:
          hists = [items.indices(items.catalog.history(_text(examples[i]["user_id"]), split))
                   for i in indices]
          # Power-of-two widths: a handful of compiled shapes, not one per batch.
          width = _pow2_at_least(max([len(h) for h in hists] + [1]))
          exclude = np.full((cfg.batch_size, width), -1, np.int32)
          for r, h in enumerate(hists):
            exclude[r, :len(h)] = h
        ranked, sc = self.runner.rank_items(batch, items.trie, cfg.beam_size, cfg.alpha, exclude)
        rows = items.rows(ranked[:n])
        out.extend((int(i), r) for i, r in zip(indices, rows))
        scores.extend(s.tolist() for s in sc[:n])
      return out, {"scores": scores}

    return predict

  def _candidate_fn(self, info, examples):
    cfg, items = self.config, self.item_index(info.dataset)
    num_c = max(len(ex["candidates"]) for ex in examples)
    if num_c == 0:
      raise EvaluationError(f"task {info.task}: examples have no 'candidates' to rank")
    top = min(cfg.beam_size, num_c)

    def predict(ds, model_feature_shapes=None):
      del model_feature_shapes
      out, scores = [], []
      for indices, batch, n in _batches(ds, cfg.candidate_batch_size):
        cand_BxC = np.full((cfg.candidate_batch_size, num_c), -1, np.int64)
        for r, i in enumerate(indices):
          idx = items.indices(examples[i]["candidates"])
          cand_BxC[r, :len(idx)] = idx
        options = items.rows(cand_BxC)
        lls = self.runner.score_options(batch, options)
        ranking, ranked_scores = decoding.rank_candidates(
            jnp.asarray(lls.reshape(-1)), num_c, jnp.asarray(cand_BxC >= 0))
        ranking = np.asarray(ranking)[:, :top]
        ranked_items = np.take_along_axis(cand_BxC, ranking, axis=1)
        rows = items.rows(ranked_items[:n])
        out.extend((int(i), r) for i, r in zip(indices, rows))
        scores.extend(s.tolist() for s in np.asarray(ranked_scores)[:n, :top])
      return out, {"scores": scores}

    return predict

  def _binary_fn(self, info, examples):
    cfg = self.config
    vocab = self.runner.model.output_vocabulary
    options = _binary_options(examples)
    tokens = [list(vocab.encode(o)) + [vocab.eos_id] for o in options]
    width = max(len(t) for t in tokens)
    table = np.zeros((2, width), np.int32)
    for r, t in enumerate(tokens):
      table[r, :len(t)] = t
    def predict(ds, model_feature_shapes=None):
      del model_feature_shapes
      out, scores = [], []
      for indices, batch, n in _batches(ds, cfg.batch_size):
        opts = np.broadcast_to(table, (cfg.batch_size,) + table.shape)
        lls = self.runner.score_options(batch, opts)
        # P(answer) normalised over the two options; the answer is the argmax.
        norm = lls - np.logaddexp(lls[:, :1], lls[:, 1:])
        pick = np.argmax(lls, axis=1)
        for r, i in enumerate(indices[:n]):
          out.append((int(i), table[pick[r]]))
          scores.append(float(norm[r, pick[r]]))
      return out, {"scores": scores}

    return predict

  def _decode_fn(self, num_decodes, alpha):
    cfg = self.config

    def predict(ds, model_feature_shapes=None):
      del model_feature_shapes
      out, scores = [], []
      for indices, batch, n in _batches(ds, cfg.batch_size):
        tokens, sc = self.runner.decode(batch, num_decodes, alpha)
        out.extend((int(i), t) for i, t in zip(indices, tokens[:n]))
        scores.extend(float(s) for s in sc[:n])
      return out, {"scores": scores}

    return predict

  # -- driver

  def evaluate_task(self, task_name: str, split: str = "test",
                    task_feature_lengths: Optional[Mapping[str, int]] = None,
                    step: Optional[int] = None) -> TaskResult:
    """Evaluates one per-prompt task through `seqio.Evaluator`."""
    task = seqio.get_mixture_or_task(task_name)
    info = prompt_info(task, self.config)
    t0 = time.time()
    evaluator = self._evaluator_cls(
        mixture_or_task_name=task_name,
        feature_converter=self._converter_cls(pack=False),
        eval_split=split, use_cached=False, seed=42,
        sequence_length=dict(task_feature_lengths) if task_feature_lengths else None,
        num_examples=self.config.max_examples, use_memory_cache=True,
        async_compute_metrics=False)
    if not evaluator.eval_tasks:
      raise EvaluationError(f"task {task_name!r} has no split {split!r} with metrics")
    examples = list(tfds.as_numpy(evaluator.cached_task_datasets[task_name]))
    if not examples:
      raise EvaluationError(f"task {task_name!r}, split {split!r}: no examples")
    if info.kind == ITEM:
      fn = self._rank_fn(info, examples, split)
    elif info.kind == CANDIDATES:
      fn = self._candidate_fn(info, examples)
    elif info.kind == BINARY:
      fn = self._binary_fn(info, examples)
    elif info.kind == RATING:
      fn = self._decode_fn(self.config.rating_beam_size, 0.0)
    else:
      fn = self._decode_fn(self.config.text_beam_size, self.config.text_alpha)
    # One model pass per task, shared by the metrics with and without aux
    # values; its scores are also kept for the TaskResult.
    recorded = {}
    fn = _memoized(_recording(fn, recorded))
    fns = {"predict_fn": _without_aux(fn), "predict_with_aux_fn": fn}
    metrics_future, outputs = evaluator.evaluate(compute_metrics=True, step=step, **fns)
    metrics = {k: _to_float(v) for k, v in metrics_future.result()[task_name].items()}
    seconds = time.time() - t0
    predictions = _postprocessed_predictions(task, outputs[task_name], examples)
    row = {"task": task_name, "dataset": info.dataset, "family": info.family,
           "prompt": info.prompt, "seen": info.seen, "kind": info.kind, "split": split,
           "examples": len(examples), "seconds": round(seconds, 2), **metrics}
    logging.info("%s: %s", task_name, metrics)
    return TaskResult(
        info=info, row=row, metrics=metrics,
        inputs=[_text(ex.get("inputs_pretokenized", b"")) for ex in examples],
        targets=[task.postprocess_fn(_text(ex.get("targets_pretokenized", b"")),
                                     example=ex, is_target=True) for ex in examples],
        predictions=predictions, scores=recorded.get("scores", []))

  def evaluate(self, mixture_or_task_name: str, split: str = "test",
               task_feature_lengths: Optional[Mapping[str, int]] = None,
               step: Optional[int] = None,
               on_result: Optional[Callable[[TaskResult], None]] = None) -> List[TaskResult]:
    """Evaluates every per-prompt task of a mixture (or one task)."""
    tasks = eval_task_names(mixture_or_task_name, split)
    results = []
    for name in tasks:
      result = self.evaluate_task(name, split, task_feature_lengths, step)
      if on_result is not None:
        on_result(result)
      results.append(result)
    return results


def eval_task_names(mixture_or_task_name: str, split: str) -> List[str]:
  """The sub-tasks of a mixture that have `split` and metrics, in mixture order."""
  tasks = seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))
  names = [t.name for t in tasks if split in t.splits and t.metric_fns]
  if not names:
    raise EvaluationError(f"{mixture_or_task_name!r} has no task with split {split!r} "
                          "and metric functions")
  return names


def _without_aux(fn):
  return lambda ds, model_feature_shapes=None: fn(ds, model_feature_shapes)[0]


def _memoized(fn):
  """Runs `fn` once per dataset (SeqIO asks once per model-output type)."""
  cache = {}

  def call(ds, model_feature_shapes=None):
    if id(ds) not in cache:
      cache[id(ds)] = (ds, fn(ds, model_feature_shapes))
    return cache[id(ds)][1]

  return call


def _recording(fn, recorded):
  """Wraps a model fn so its aux scores are also kept (in example order)."""

  def with_aux(ds, model_feature_shapes=None):
    result = fn(ds, model_feature_shapes)
    if isinstance(result, tuple):
      out, aux = result
      order = np.argsort([i for i, _ in out])
      recorded["scores"] = [aux["scores"][j] for j in order]
    return result

  return with_aux


def _postprocessed_predictions(task: seqio.Task, outputs: Mapping[Any, Any],
                               examples: Sequence[Mapping[str, Any]]) -> List[Any]:
  """Decodes SeqIO's stored model outputs the way its metrics saw them."""
  vocab = task.output_features["targets"].vocabulary
  output = next(iter(outputs.values()))
  tokens = output[0] if isinstance(output, tuple) else output
  preds = []
  for ex, t in zip(examples, tokens):
    t = np.asarray(t)
    decoded = [vocab.decode(r.tolist()) for r in t] if t.ndim == 2 else vocab.decode(t.tolist())
    preds.append(task.postprocess_fn(decoded, example=ex, is_target=False))
  return preds


def _to_float(v) -> float:
  v = getattr(v, "value", v)
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


# ------------------------------------------------------------------- results


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> List[str]:
  present = {k for r in rows for k in r if k in METRIC_ORDER}
  return [m for m in METRIC_ORDER if m in present]


def _fmt(v) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
  return str(v)


def results_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """One markdown table row per prompt; metrics a prompt lacks show "–"."""
  cols = ["task", "prompt", "family", "seen", "examples"] + metric_columns(rows)
  lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for r in rows:
    cells = [("seen" if r.get("seen") else "unseen") if c == "seen" else _fmt(r.get(c))
             for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _plot(rows: Sequence[Mapping[str, Any]]) -> bytes:
  import io
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = [c for c in metric_columns(rows) if c != "invalid"] or ["examples"]
  fig, axes = plt.subplots(len(cols), 1, figsize=(max(6, 0.6 * len(rows) + 2), 2.4 * len(cols)),
                           squeeze=False)
  for ax, col in zip(axes[:, 0], cols):
    sub = [r for r in rows if isinstance(r.get(col), (int, float)) and not math.isnan(r[col])]
    labels = [r["prompt"] if r.get("prompt") else r["task"] for r in sub]
    colors = ["tab:blue" if r.get("seen", True) else "tab:orange" for r in sub]
    ax.bar(range(len(sub)), [r[col] for r in sub], color=colors)
    ax.set_xticks(range(len(sub)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(col)
  axes[0, 0].set_title("per-prompt metrics (blue: seen, orange: unseen prompts)")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80)
  plt.close(fig)
  return buf.getvalue()


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: str,
                  extra: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
  """Writes results.md, results.json and results.png (atomically) to `out_dir`."""
  rows = [dict(r) for r in rows]
  paths = {name: os.path.join(out_dir, f"results.{name}") for name in ("md", "json", "png")}
  fileio.atomic_write(paths["md"], results_markdown(rows).encode())
  payload = {"rows": rows, **dict(extra or {})}
  fileio.atomic_write(paths["json"], json.dumps(payload, indent=1, default=_json_default,
                                          allow_nan=True).encode())
  fileio.atomic_write(paths["png"], _plot(rows))
  return paths


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
