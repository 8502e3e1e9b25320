"""The P5 encoder as a feature extractor: pooled embeddings in a Parquet file.

A trained P5 model reads a task's prompts; its encoder states are pooled into
fixed-size vectors that a light prediction head (`p5jax.heads`) is trained on.
Per example the feature file holds::

  example_index int64    position in the (unshuffled) split, for joins
  split        string    "train" | "validation" | "test"
  user_id      string    p5 id of the first `user_<id>` word in the prompt, or ""
  item_id      string    p5 id of the first `item_<id>` word in the prompt, or ""
  rating       float32   target parsed as a number ("4.0"), else null
  label        int8      1 for "yes"/"like", 0 for "no"/"dislike", else null
  target       string    the decoded target text
  has_user_span, has_item_span  bool
  pooled_mean  float32[D]  mean over non-padding encoder tokens (EOS included)
  user_span    float32[D]  mean over the tokens of every `user_<id>` word with
                           that id (the whole-word span); zeros if absent
  item_span    float32[D]  same for `item_<id>`
  yes_no_logit float32     optional: log p("yes") - log p("no") by `score_batch`

The column layout travels in the Parquet schema metadata under
`SCHEMA_METADATA_KEY` as JSON (`FeatureSchema`), so a head can check that a
file matches what it was fitted on.

Pooling runs inside one jitted function with static shapes (batch padded to
`batch_size`). The span masks are computed on the host from token pieces: a
whole word whose pieces spell `user_<digits>` (punctuation after it allowed).
"""
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_METADATA_KEY = b"p5jax.features"
FORMAT_VERSION = 1
VECTOR_COLUMNS = ("pooled_mean", "user_span", "item_span")
TARGET_COLUMNS = {"rating": "rating", "click": "label"}
SCORE_COLUMNS = {"click": "yes_no_logit"}
SPLIT_COLUMN = "split"
ID_COLUMNS = ("user_id", "item_id")

_POSITIVE = ("yes", "like", "true")
_NEGATIVE = ("no", "dislike", "false")
_ID_WORD = re.compile(r"^(user|item)_(?:<i)?(\d+)")  # item_7391, item_<i7391>
_SPACE = "\u2581"  # SentencePiece word-start marker.


class FeatureFileError(ValueError):
  """A feature file cannot be written or read as documented (names file/column)."""


# ----------------------------------------------------------------------------
# Schema and Parquet I/O.


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
  """What a feature file contains; stored as JSON in the Parquet metadata."""
  vector_columns: Mapping[str, int]          # column -> dimension D
  target_columns: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: dict(TARGET_COLUMNS))
  score_columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
  id_columns: Sequence[str] = ID_COLUMNS
  split_column: str = SPLIT_COLUMN
  source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  format_version: int = FORMAT_VERSION

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["vector_columns"] = dict(self.vector_columns)
    d["id_columns"] = list(self.id_columns)
    return json.dumps(d, sort_keys=True)

  @classmethod
  def from_json(cls, text: str, path: str = "<memory>") -> "FeatureSchema":
    try:
      d = json.loads(text)
      d["vector_columns"] = {k: int(v) for k, v in d["vector_columns"].items()}
      d["id_columns"] = tuple(d.get("id_columns", ID_COLUMNS))
      known = {f.name for f in dataclasses.fields(cls)}
      return cls(**{k: v for k, v in d.items() if k in known})
    except (ValueError, KeyError, TypeError) as e:
      raise FeatureFileError(f"{path}: bad feature schema metadata: {e}") from e

  def arrow_schema(self) -> pa.Schema:
    fields = [
        pa.field("example_index", pa.int64(), nullable=False),
        pa.field(self.split_column, pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("rating", pa.float32()),
        pa.field("label", pa.int8()),
        pa.field("target", pa.string()),
        pa.field("has_user_span", pa.bool_()),
        pa.field("has_item_span", pa.bool_()),
    ]
    fields += [pa.field(c, pa.float32()) for c in sorted(set(self.score_columns.values()))]
    fields += [pa.field(name, pa.list_(pa.float32(), dim), nullable=False)
               for name, dim in self.vector_columns.items()]
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: self.to_json().encode()})


def read_schema(path: str) -> FeatureSchema:
  """Reads the `FeatureSchema` of a feature file without reading its rows."""
  if not os.path.exists(path):
    raise FeatureFileError(f"{path}: feature file does not exist")
  try:
    arrow_schema = pq.read_schema(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise FeatureFileError(f"{path}: not a Parquet feature file: {e}") from e
  meta = arrow_schema.metadata or {}
  if SCHEMA_METADATA_KEY not in meta:
    raise FeatureFileError(
        f"{path}: Parquet metadata has no {SCHEMA_METADATA_KEY.decode()!r} key; "
        "write feature files with p5jax.embed / features.FeatureWriter")
  schema = FeatureSchema.from_json(meta[SCHEMA_METADATA_KEY].decode(), path)
  for name, dim in schema.vector_columns.items():
    idx = arrow_schema.get_field_index(name)
    if idx < 0:
      raise FeatureFileError(f"{path}: column {name!r} is in the schema metadata "
                             "but not in the file")
    ftype = arrow_schema.field(idx).type
    if not (pa.types.is_fixed_size_list(ftype) and ftype.list_size == dim):
      raise FeatureFileError(f"{path}: column {name!r} has type {ftype}, "
                             f"schema says float32[{dim}]")
  return schema


class FeatureWriter:
  """Streams row batches into a Parquet feature file; the file appears atomically.

  Use as a context manager: rows go to a temporary file next to `path`, which
  replaces `path` only when the block exits without an exception.
  """

  def __init__(self, path: str, schema: FeatureSchema):
    self.path = os.path.abspath(path)
    self.schema = schema
    self._arrow_schema = schema.arrow_schema()
    self._tmp: Optional[str] = None
    self._writer: Optional[pq.ParquetWriter] = None
    self.num_rows = 0

  def __enter__(self) -> "FeatureWriter":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet",
                                     dir=os.path.dirname(self.path))
    os.close(fd)
    self._writer = pq.ParquetWriter(self._tmp, self._arrow_schema)
    return self

  def write(self, columns: Mapping[str, Any]) -> None:
    """Writes one batch; `columns` maps every column name to a sequence/array."""
    arrays = []
    n = None
    for field in self._arrow_schema:
      if field.name not in columns:
        raise FeatureFileError(f"{self.path}: batch lacks column {field.name!r}")
      value = columns[field.name]
      if pa.types.is_fixed_size_list(field.type):
        v = np.asarray(value, np.float32)
        if v.ndim != 2 or v.shape[1] != field.type.list_size:
          raise FeatureFileError(
              f"{self.path}: column {field.name!r} has shape {v.shape}, "
              f"expected [N, {field.type.list_size}]")
        arr = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)),
                                                field.type.list_size)
      else:
        arr = pa.array(value, type=field.type)
      if n is not None and len(arr) != n:
        raise FeatureFileError(f"{self.path}: column {field.name!r} has {len(arr)} "
                               f"rows, others have {n}")
      n = len(arr)
      arrays.append(arr)
    self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._arrow_schema))
    self.num_rows += n

  def __exit__(self, exc_type, exc, tb) -> None:
    self._writer.close()
    if exc_type is None:
      os.replace(self._tmp, self.path)
    else:
      os.unlink(self._tmp)


# ----------------------------------------------------------------------------
# Pooling (runs under jit) and span masks (host side, from token pieces).


def masked_mean(x_BxLxD, mask_BxL):
  """Mean of `x` over positions where `mask` is set; zeros where none is set."""
  import jax.numpy as jnp
  m = mask_BxL.astype(jnp.float32)[..., None]
  total_BxD = jnp.sum(x_BxLxD.astype(jnp.float32) * m, axis=1)
  count_Bx1 = jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return total_BxD / count_Bx1


def pool_encodings(encoded_BxLxD, tokens_BxL, user_mask_BxL, item_mask_BxL):
  """The three pooled vectors of a batch, each [B, D] float32."""
  return {
      "pooled_mean": masked_mean(encoded_BxLxD, tokens_BxL > 0),
      "user_span": masked_mean(encoded_BxLxD, user_mask_BxL),
      "item_span": masked_mean(encoded_BxLxD, item_mask_BxL),
  }


def vocabulary_pieces(vocabulary) -> np.ndarray:
  """The text piece of every id of a seqio SentencePiece vocabulary ([V] object)."""
  sp = vocabulary.tokenizer
  n_sp = sp.get_piece_size()
  pieces = [sp.id_to_piece(i) for i in range(n_sp)]
  pieces += [f"<extra_id_{i}>" for i in range(vocabulary.vocab_size - n_sp)]
  return np.array(pieces, dtype=object)


def whole_word_ids_from_pieces(tokens_BxL: np.ndarray, pieces: np.ndarray) -> np.ndarray:
  """Numbers words 1.. per row: a word starts at a piece beginning with '▁'.

  Same convention as `p5jax.vocab.whole_word_ids` (pad and EOS get 0); used
  only when a batch carries no `encoder_whole_word_ids`.
  """
  tokens = np.asarray(tokens_BxL)
  special = np.isin(pieces, ["<pad>", "</s>"])[tokens]
  starts = np.vectorize(lambda p: p.startswith(_SPACE), otypes=[bool])(pieces)[tokens]
  starts[:, 0] = True
  ids = np.cumsum(starts & ~special, axis=1)
  return np.where(special, 0, ids).astype(np.int32)


class SpanFinder:
  """Finds the `user_<id>` / `item_<id>` whole-word spans of tokenized prompts."""

  def __init__(self, pieces: np.ndarray):
    self.pieces = pieces
    # Only words with a piece holding "_" can be ID words, however the
    # vocabulary splits "user_23"; checking those alone keeps host work small.
    self._maybe_id = np.array(["_" in p for p in pieces], dtype=bool)

  def __call__(self, tokens_BxL: np.ndarray, whole_word_ids_BxL: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray, List[str], List[str]]:
    """Returns user_mask [B, L] bool, item_mask [B, L] bool, user ids, item ids."""
    tokens = np.asarray(tokens_BxL)
    wwids = np.asarray(whole_word_ids_BxL)
    b_size, _ = tokens.shape
    masks = {"user": np.zeros(tokens.shape, bool), "item": np.zeros(tokens.shape, bool)}
    found = {"user": [""] * b_size, "item": [""] * b_size}
    cand = self._maybe_id[tokens] & (wwids > 0)
    for b in np.unique(np.nonzero(cand)[0]):
      for w in np.unique(wwids[b][cand[b]]):  # ascending = left to right
        word_pos = np.nonzero(wwids[b] == w)[0]
        text = "".join(self.pieces[tokens[b, word_pos]]).lstrip(_SPACE)
        match = _ID_WORD.match(text)
        if not match:
          continue
        kind, ident = match.group(1), match.group(2)
        if not found[kind][b]:
          found[kind][b] = ident
        if found[kind][b] == ident:  # every mention of the first id found
          masks[kind][b, word_pos] = True
    return masks["user"], masks["item"], found["user"], found["item"]


def parse_target(text: str) -> Tuple[Optional[float], Optional[int]]:
  """Target text -> (rating or None, yes/no label or None)."""
  t = text.strip().lower()
  label = 1 if t in _POSITIVE else 0 if t in _NEGATIVE else None
  try:
    rating = float(t)
    if not np.isfinite(rating):
      rating = None
  except ValueError:
    rating = None
  return rating, label


# ----------------------------------------------------------------------------
# The extractor.


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
  """What to embed and how (global batch size; padded to static shape)."""
  task: str
  splits: Sequence[str] = ("test",)
  batch_size: int = 64
  inputs_length: int = 512
  targets_length: int = 64
  max_examples: Optional[int] = None   # per split; None = all
  score_yes_no: bool = False           # also write `yes_no_logit` via score_batch


def abstract_params(model, partitioner, input_shapes: Mapping[str, Tuple[int, ...]]):
  """(abstract params with shardings, params mesh axes), as the trainer lays them out."""
  from p5jax import evaluation  # pylint: disable=g-import-not-at-top
  return evaluation.init_params_axes(model, partitioner, dict(input_shapes))


def init_params(model, partitioner, input_shapes, seed: int = 0):
  """Randomly initialised, sharded params and their mesh axes (tests, smoke runs)."""
  import jax
  from p5jax import partitioning
  _, axes = abstract_params(model, partitioner, input_shapes)
  init = partitioner.partition(
      lambda rng: partitioning.unbox(
          dict(model.get_initial_variables(rng, input_shapes))["params"]),
      in_axis_resources=None, out_axis_resources=axes)
  return init(jax.random.key(seed)), axes


def model_input_shapes(config: EmbedConfig) -> Dict[str, Tuple[int, ...]]:
  b = config.batch_size
  return {"encoder_input_tokens": (b, config.inputs_length),
          "encoder_whole_word_ids": (b, config.inputs_length),
          "decoder_input_tokens": (b, config.targets_length),
          "decoder_target_tokens": (b, config.targets_length)}


class Embedder:
  """Runs a model's encoder over batches and pools the states.

  One partitioned (jitted) step with static shapes: params sharded by their
  logical axes, the batch over the ``data`` mesh axis, as in eval.

  Args:
    model: a `p5jax.models.EncoderDecoderModel` (its `module` has `encode`).
    params: the (sharded) model parameters.
    params_axes: their mesh axes (see `abstract_params`).
    partitioner: a `p5jax.partitioning.Partitioner`.
    batch_size: the global batch size every step is padded to.
    score_yes_no: also compute log p("yes") - log p("no") with `score_batch`.
  """

  def __init__(self, model, params, params_axes, partitioner, batch_size: int,
               score_yes_no: bool = False):
    self.model = model
    self.params = params
    self.partitioner = partitioner
    self.batch_size = batch_size
    partitioner.get_data_layout(batch_size)  # checks divisibility by data shards
    self.pieces = vocabulary_pieces(model.input_vocabulary)
    self.span_finder = SpanFinder(self.pieces)
    module = model.module
    data_axes = partitioner.data_partition_spec

    def step(params, batch):
      encoded_BxLxD = module.apply(
          {"params": params}, batch["encoder_input_tokens"],
          encoder_whole_word_ids=batch["encoder_whole_word_ids"],
          enable_dropout=False, method=module.encode)
      return pool_encodings(encoded_BxLxD, batch["encoder_input_tokens"],
                            batch["user_mask"], batch["item_mask"])

    self._step = partitioner.partition(step, in_axis_resources=(params_axes, data_axes),
                                       out_axis_resources=None)
    self._yes_no = None
    if score_yes_no:
      out_vocab = model.output_vocabulary
      self._answers = [list(out_vocab.encode(a)) + [out_vocab.eos_id] for a in ("yes", "no")]

      def yes_no(params, batch):
        scores = []
        for answer in self._answers:  # unrolled at trace time: two decoder passes
          tgt = jnp_answer(answer, batch["decoder_target_tokens"].shape)
          b = dict(batch, decoder_target_tokens=tgt,
                   decoder_input_tokens=shift_right(tgt),
                   decoder_loss_weights=(tgt > 0).astype(tgt.dtype))
          scores.append(model.score_batch(params, b))
        return scores[0] - scores[1]

      self._yes_no = partitioner.partition(
          yes_no, in_axis_resources=(params_axes, data_axes), out_axis_resources=None)

  def embed_batch(self, batch: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """Pools one converted host batch of <= batch_size rows (padded here)."""
    import jax
    tokens = np.asarray(batch["encoder_input_tokens"], np.int32)
    n = tokens.shape[0]
    wwids = batch.get("encoder_whole_word_ids")
    wwids = (whole_word_ids_from_pieces(tokens, self.pieces) if wwids is None
             else np.asarray(wwids, np.int32))
    user_mask, item_mask, users, items = self.span_finder(tokens, wwids)
    padded = {"encoder_input_tokens": tokens, "encoder_whole_word_ids": wwids,
              "user_mask": user_mask, "item_mask": item_mask}
    if self._yes_no is not None:
      padded["decoder_target_tokens"] = np.asarray(batch["decoder_target_tokens"], np.int32)
    # Static shapes: one compilation for the whole run.
    padded = {k: np.concatenate([v, np.zeros((self.batch_size - n,) + v.shape[1:], v.dtype)])
              for k, v in padded.items()}
    global_batch = self.partitioner.host_local_to_global(padded)
    model_batch = {k: v for k, v in global_batch.items() if not k.endswith("_mask")}
    pooled = jax.device_get(self._step(self.params, global_batch))
    out = {k: np.asarray(v)[:n] for k, v in pooled.items()}
    out.update(user_id=users, item_id=items, has_user_span=user_mask.any(axis=1),
               has_item_span=item_mask.any(axis=1))
    if self._yes_no is not None:
      logit = jax.device_get(self._yes_no(self.params, model_batch))
      out["yes_no_logit"] = np.asarray(logit, np.float32)[:n]
    return out


def jnp_answer(answer: Sequence[int], shape_BxT):
  """[B, T] int32 target rows all holding `answer` (then padding)."""
  import jax.numpy as jnp
  row = np.zeros((shape_BxT[1],), np.int32)
  if len(answer) > len(row):
    raise FeatureFileError(f"the answer tokens {list(answer)} do not fit targets_length="
                           f"{len(row)}; raise --targets_length")
  row[:len(answer)] = answer
  return jnp.broadcast_to(jnp.asarray(row), shape_BxT)


def shift_right(targets_BxT):
  """Decoder inputs for teacher forcing: targets shifted right, BOS = 0."""
  import jax.numpy as jnp
  return jnp.pad(targets_BxT, ((0, 0), (1, 0)))[:, :-1]


def task_batches(task: str, split: str, feature_converter, config: EmbedConfig
                 ) -> Iterator[Dict[str, np.ndarray]]:
  """Converted, unshuffled host batches of a seqio task split (last may be short)."""
  import seqio
  ds = seqio.get_dataset(
      task, {"inputs": config.inputs_length, "targets": config.targets_length},
      feature_converter=feature_converter, dataset_split=split, shuffle=False,
      num_epochs=1, use_cached=False, verbose=False)
  if config.max_examples is not None:
    ds = ds.take(config.max_examples)
  return ds.batch(config.batch_size, drop_remainder=False).as_numpy_iterator()


def export_features(embedder: Embedder, config: EmbedConfig, feature_converter,
                    out_path: str, source: Optional[Mapping[str, Any]] = None,
                    progress: bool = True) -> FeatureSchema:
  """Embeds every split of `config.task` into the Parquet file `out_path`.

  Rows are written batch by batch (bounded memory); the file appears only
  when every split is done (atomic rename).
  """
  out_vocab = embedder.model.output_vocabulary
  writer = None
  started = time.time()
  try:
    for split in config.splits:
      index = 0
      for batch in task_batches(config.task, split, feature_converter, config):
        pooled = embedder.embed_batch(batch)
        n = len(pooled["user_id"])
        if writer is None:
          d_model = pooled["pooled_mean"].shape[1]
          schema = FeatureSchema(
              vector_columns={c: d_model for c in VECTOR_COLUMNS},
              score_columns=dict(SCORE_COLUMNS) if config.score_yes_no else {},
              source=dict(source or {}, task=config.task, splits=list(config.splits)))
          writer = FeatureWriter(out_path, schema).__enter__()
        targets = [out_vocab.decode([int(t) for t in row if t > 0])
                   for row in batch["decoder_target_tokens"]]
        parsed = [parse_target(t) for t in targets]
        writer.write(dict(pooled, example_index=np.arange(index, index + n),
                          split=[split] * n, target=targets,
                          rating=[p[0] for p in parsed], label=[p[1] for p in parsed]))
        index += n
        if progress:
          rate = writer.num_rows / max(time.time() - started, 1e-9)
          print(f"\r[embed] {split}: {index} examples ({rate:.1f}/s)", end="",
                file=sys.stderr, flush=True)
      if progress:
        print(file=sys.stderr)
      if index == 0:
        raise FeatureFileError(f"task {config.task!r} split {split!r} has no examples")
  except BaseException as e:
    if writer is not None:
      writer.__exit__(type(e), e, None)
    raise
  writer.__exit__(None, None, None)
  return schema
