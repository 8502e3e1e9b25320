"""Light prediction heads on exported P5 features, and the side-by-side table.

A head maps the vectors of a feature file (`p5jax.features`) to a rating
(regression) or a yes/no click probability (classification):

  linear    ridge regression          (rating)
  logistic  logistic regression       (click)
  tree      decision tree             (rating | click)
  gbdt      histogram gradient boosting (rating | click)
  mlp       small Flax MLP trained with optax, early stopping on validation
  mean      the training mean / prior (sanity floor)

Inputs are feature groups: any vector column of the file (`pooled_mean`,
`user_span`, `item_span`) and `ids`, target-encoded user/item statistics
from the training split (smoothed mean target and log count per user and per
item; leave-one-out on training rows). A head on `ids` alone is the baseline
that shows what pretraining adds.

Heads fit on the `train` split, stop early (MLP) on `validation`, and report
on `test`. A fitted head is a directory: `head.json` (config, feature schema,
metrics; written last) and `model.joblib` (scikit-learn) or `mlp.npz` (Flax).
"""
import dataclasses
import functools
import json
import math
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from p5jax import features as features_lib

HEADS = ("linear", "logistic", "tree", "gbdt", "mlp", "mean")
TARGETS = ("rating", "click")
_HEAD_TARGETS = {"linear": ("rating",), "logistic": ("click",)}
ID_INPUT = "ids"


class HeadError(ValueError):
  """Base class: a head cannot be fitted or applied to the given features."""


class SchemaMismatchError(HeadError):
  """The feature file does not have the columns/dimensions the head needs."""


class MissingTargetError(HeadError):
  """The target column is absent or has null values in a split used."""


class NonFiniteFeatureError(HeadError):
  """A feature column holds NaN or infinite values."""


class EmptySplitError(HeadError):
  """A split needed for fitting or evaluation has no rows."""


# ----------------------------------------------------------------------------
# Reading features.


@dataclasses.dataclass
class SplitData:
  """One split of a feature file, as host arrays."""
  vectors: Dict[str, np.ndarray]        # column -> [N, D] float32
  user_ids: np.ndarray                  # [N] object
  item_ids: np.ndarray                  # [N] object
  targets: Dict[str, np.ndarray]        # "rating"/"click" -> [N] float64, NaN = null
  scores: Dict[str, np.ndarray]         # e.g. "click" -> yes_no_logit [N]

  def __len__(self) -> int:
    return len(self.user_ids)


def _column_to_numpy(table: pa.Table, name: str) -> np.ndarray:
  col = table.column(name).combine_chunks()
  if pa.types.is_fixed_size_list(col.type):
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
  if pa.types.is_string(col.type):
    return np.array(col.to_pylist(), dtype=object)
  return col.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _read_schema(path: str) -> features_lib.FeatureSchema:
  try:
    return features_lib.read_schema(path)
  except features_lib.FeatureFileError as e:
    raise SchemaMismatchError(str(e)) from e


def load_features(path: str, vector_columns: Optional[Sequence[str]] = None
                  ) -> Tuple[features_lib.FeatureSchema, Dict[str, SplitData]]:
  """Reads a feature file into per-split arrays.

  Args:
    path: a Parquet file written by `p5jax.embed`.
    vector_columns: the vector columns needed (default: all in the schema).
  Raises:
    SchemaMismatchError: a requested column is not in the file's schema.
    NonFiniteFeatureError: a requested vector column holds NaN/inf.
  """
  schema = _read_schema(path)
  wanted = list(schema.vector_columns) if vector_columns is None else list(vector_columns)
  for name in wanted:
    if name not in schema.vector_columns:
      raise SchemaMismatchError(
          f"{path}: no vector column {name!r}; the file has "
          f"{sorted(schema.vector_columns)}")
  file_cols = set(pq.read_schema(path).names)
  optional = [c for c in list(schema.target_columns.values()) +
              list(schema.score_columns.values()) if c in file_cols]
  needed = [schema.split_column, *schema.id_columns] + optional + wanted
  missing = [c for c in needed if c not in file_cols]
  if missing:
    raise SchemaMismatchError(f"{path}: columns {missing} are missing")
  table = pq.read_table(path, columns=sorted(set(needed)))
  splits = _column_to_numpy(table, schema.split_column)
  arrays = {c: _column_to_numpy(table, c) for c in set(needed) - {schema.split_column}}
  for name in wanted:
    bad = ~np.isfinite(arrays[name]).all(axis=1)
    if bad.any():
      raise NonFiniteFeatureError(
          f"{path}: column {name!r} has NaN/inf in {int(bad.sum())} rows "
          f"(first at row {int(np.argmax(bad))})")
  out = {}
  for split in sorted(set(splits)):
    sel = splits == split
    out[split] = SplitData(
        vectors={c: arrays[c][sel].astype(np.float32) for c in wanted},
        user_ids=arrays[schema.id_columns[0]][sel],
        item_ids=arrays[schema.id_columns[1]][sel],
        targets={t: arrays[c][sel] for t, c in schema.target_columns.items() if c in arrays},
        scores={t: arrays[c][sel] for t, c in schema.score_columns.items() if c in arrays})
  return schema, out


# ----------------------------------------------------------------------------
# The ID-feature baseline.


class IdTargetEncoder:
  """Smoothed per-user and per-item target means and log counts (4 features).

  mean_u = (sum_u + m * global) / (count_u + m). On the rows it was fitted on,
  `transform(..., y=y)` leaves each row's own target out, so a head trained on
  these features does not learn from its own label.
  """

  def __init__(self, smoothing: float = 5.0):
    self.smoothing = smoothing

  def fit(self, user_ids, item_ids, y) -> "IdTargetEncoder":
    y = np.asarray(y, np.float64)
    self.global_mean_ = float(y.mean())
    self.stats_ = {}
    for kind, ids in (("user", user_ids), ("item", item_ids)):
      keys, inv = np.unique(np.asarray(ids, dtype=object).astype(str), return_inverse=True)
      sums = np.bincount(inv, weights=y, minlength=len(keys))
      counts = np.bincount(inv, minlength=len(keys)).astype(np.float64)
      self.stats_[kind] = {k: (s, c) for k, s, c in zip(keys.tolist(), sums, counts)}
    return self

  def transform(self, user_ids, item_ids, y=None) -> np.ndarray:
    """[N, 4]: user mean, item mean, log1p(user count), log1p(item count)."""
    m, g = self.smoothing, self.global_mean_
    cols = []
    for kind, ids in (("user", user_ids), ("item", item_ids)):
      st = self.stats_[kind]
      sc = np.array([st.get(str(i), (0.0, 0.0)) for i in ids], np.float64).reshape(-1, 2)
      sums, counts = sc[:, 0], sc[:, 1]
      if y is not None:  # leave-one-out on the fitting rows
        sums, counts = sums - np.asarray(y, np.float64), np.maximum(counts - 1, 0)
      cols += [(sums + m * g) / (counts + m), np.log1p(counts)]
    return np.stack([cols[0], cols[2], cols[1], cols[3]], axis=1).astype(np.float32)


def design_matrix(data: SplitData, inputs: Sequence[str],
                  id_encoder: Optional[IdTargetEncoder], y_for_loo=None) -> np.ndarray:
  """Concatenates the input groups into X [N, F] (float32)."""
  parts = []
  for name in inputs:
    if name == ID_INPUT:
      parts.append(id_encoder.transform(data.user_ids, data.item_ids, y=y_for_loo))
    else:
      parts.append(data.vectors[name])
  return np.concatenate(parts, axis=1) if parts else np.zeros((len(data), 0), np.float32)


# ----------------------------------------------------------------------------
# Models.


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """The small Flax MLP head."""
  hidden: Tuple[int, ...] = (128, 64)
  dropout_rate: float = 0.1
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  batch_size: int = 256
  max_epochs: int = 200
  patience: int = 10       # epochs without validation improvement before stopping
  seed: int = 0


def _mlp_module(hidden: Tuple[int, ...], dropout_rate: float):
  import flax.linen as nn

  class MLP(nn.Module):
    """Dense-ReLU-Dropout blocks, then one output unit: [B, F] -> [B]."""

    @nn.compact
    def __call__(self, x_BxF, train: bool = False):
      h = x_BxF
      for width in hidden:
        h = nn.relu(nn.Dense(width)(h))
        h = nn.Dropout(dropout_rate, deterministic=not train)(h)
      return nn.Dense(1)(h)[:, 0]

  return MLP()


@functools.lru_cache(maxsize=16)
def _mlp_fns(cfg: "MLPConfig", target: str, batch: int, steps: int):
  """Jitted (init, epoch, apply) for one config; cached so that refits reuse them.

  The seed and all data are arguments, never closed over: closed-over arrays
  would become XLA constants and slow compilation down.
  """
  import jax
  import jax.numpy as jnp
  import optax
  module = _mlp_module(cfg.hidden, cfg.dropout_rate)
  tx = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)

  def loss_fn(out_B, y_B):
    if target == "click":
      return jnp.mean(optax.sigmoid_binary_cross_entropy(out_B, y_B))
    return jnp.mean(jnp.square(out_B - y_B))

  @jax.jit
  def init(seed, x_1xF):
    rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = module.init(init_rng, x_1xF)["params"]
    return params, tx.init(params), rng

  def batch_loss(params, x_BxF, y_B, drop_rng):
    out_B = module.apply({"params": params}, x_BxF, train=True, rngs={"dropout": drop_rng})
    return loss_fn(out_B, y_B)

  @jax.jit
  def epoch(params, opt_state, rng, x_NxF, y_N, xv_MxF, yv_M):
    perm_rng, rng = jax.random.split(rng)
    # A fresh permutation per epoch; the remainder rows land in later epochs.
    idx_SxB = jax.random.permutation(perm_rng, x_NxF.shape[0])[:steps * batch]
    idx_SxB = idx_SxB.reshape(steps, batch)

    def step(carry, idx_B):
      p, o, r = carry
      r, drop_rng = jax.random.split(r)
      loss, grads = jax.value_and_grad(batch_loss)(p, x_NxF[idx_B], y_N[idx_B], drop_rng)
      updates, o = tx.update(grads, o, p)
      return (optax.apply_updates(p, updates), o, r), loss

    (params, opt_state, rng), losses_S = jax.lax.scan(step, (params, opt_state, rng), idx_SxB)
    val_loss = loss_fn(module.apply({"params": params}, xv_MxF), yv_M)
    return params, opt_state, rng, losses_S.mean(), val_loss

  apply = jax.jit(lambda params, x_BxF: module.apply({"params": params}, x_BxF))
  return init, epoch, apply


class MLPHead:
  """Flax MLP on standardized inputs, trained with optax; one jitted scan per epoch.

  Rating heads regress the standardized target with squared error; click heads
  use sigmoid cross-entropy. The parameters of the best validation epoch are kept.
  """

  def __init__(self, target: str, config: MLPConfig = MLPConfig()):
    self.target = target
    self.config = config

  def _prep_y(self, y):
    if self.target == "click":
      return np.asarray(y, np.float32)
    return ((np.asarray(y, np.float64) - self.y_mean_) / self.y_std_).astype(np.float32)

  def fit(self, x, y, x_val, y_val) -> "MLPHead":
    cfg = self.config
    self.x_mean_ = x.mean(axis=0).astype(np.float32)
    self.x_std_ = (x.std(axis=0) + 1e-6).astype(np.float32)
    self.y_mean_ = float(np.mean(y)) if self.target == "rating" else 0.0
    self.y_std_ = float(np.std(y) + 1e-6) if self.target == "rating" else 1.0
    xs = (x - self.x_mean_) / self.x_std_
    ys = self._prep_y(y)
    xv = (x_val - self.x_mean_) / self.x_std_
    yv = self._prep_y(y_val)
    batch = min(cfg.batch_size, xs.shape[0])
    init, epoch, _ = _mlp_fns(dataclasses.replace(cfg, seed=0), self.target, batch,
                              xs.shape[0] // batch)
    params, opt_state, rng = init(cfg.seed, xs[:1])
    best = (math.inf, params, 0)
    for ep in range(cfg.max_epochs):
      params, opt_state, rng, _, val_loss = epoch(params, opt_state, rng, xs, ys, xv, yv)
      val_loss = float(val_loss)  # one host sync per epoch, for early stopping
      if val_loss < best[0] - 1e-6:
        best = (val_loss, params, ep)
      elif ep - best[2] >= cfg.patience:
        break
    self.best_val_loss_, self.params_, self.best_epoch_ = best[0], best[1], best[2]
    self.epochs_run_ = ep + 1
    return self

  def decision(self, x) -> np.ndarray:
    """The raw output [N] (logit for clicks, standardized rating)."""
    _, _, apply = _mlp_fns(dataclasses.replace(self.config, seed=0), self.target, 1, 1)
    out = apply(self.params_, ((x - self.x_mean_) / self.x_std_).astype(np.float32))
    return np.asarray(out, np.float64)

  def predict(self, x) -> np.ndarray:
    out = self.decision(x)
    if self.target == "click":
      return 1.0 / (1.0 + np.exp(-out))
    return out * self.y_std_ + self.y_mean_

  def save(self, directory: str) -> str:
    from flax import traverse_util
    flat = traverse_util.flatten_dict(self.params_, sep="/")
    arrays = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
    arrays.update(x_mean=self.x_mean_, x_std=self.x_std_,
                  y_stats=np.array([self.y_mean_, self.y_std_]))
    return _atomic_write(directory, "mlp.npz", lambda f: np.savez(f, **arrays), binary=True)

  @classmethod
  def load(cls, directory: str, target: str, config: MLPConfig) -> "MLPHead":
    from flax import traverse_util
    head = cls(target, config)
    with np.load(os.path.join(directory, "mlp.npz")) as z:
      flat = {k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")}
      head.params_ = traverse_util.unflatten_dict(flat, sep="/")
      head.x_mean_, head.x_std_ = z["x_mean"], z["x_std"]
      head.y_mean_, head.y_std_ = (float(v) for v in z["y_stats"])
    return head


def make_sklearn_model(head: str, target: str, seed: int = 0):
  """The scikit-learn estimator for a head name and target."""
  from sklearn import dummy, ensemble, linear_model, pipeline, preprocessing, tree
  clf = target == "click"
  if head == "linear":
    return pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.Ridge(alpha=1.0))
  if head == "logistic":
    return pipeline.make_pipeline(preprocessing.StandardScaler(),
                                  linear_model.LogisticRegression(C=1.0, max_iter=2000))
  if head == "tree":
    cls = tree.DecisionTreeClassifier if clf else tree.DecisionTreeRegressor
    return cls(max_depth=8, min_samples_leaf=20, random_state=seed)
  if head == "gbdt":
    cls = (ensemble.HistGradientBoostingClassifier if clf
           else ensemble.HistGradientBoostingRegressor)
    return cls(max_iter=200, learning_rate=0.1, random_state=seed)
  if head == "mean":
    return dummy.DummyClassifier(strategy="prior") if clf else dummy.DummyRegressor()
  raise HeadError(f"unknown head {head!r}; choose from {HEADS}")


# ----------------------------------------------------------------------------
# Fitting, metrics, saving.


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Which head, on which inputs, for which target."""
  head: str = "linear"
  target: str = "rating"
  inputs: Tuple[str, ...] = ()  # empty = every vector column of the file
  train_split: str = "train"
  validation_split: str = "validation"
  eval_split: str = "test"
  seed: int = 0
  mlp: MLPConfig = MLPConfig()


def metrics_for(target: str, y_true, y_pred) -> Dict[str, float]:
  """RMSE/MAE for ratings; AUC/accuracy/log loss for clicks (y_pred = P(yes))."""
  y_true = np.asarray(y_true, np.float64)
  y_pred = np.asarray(y_pred, np.float64)
  if target == "rating":
    err = y_pred - y_true
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err)))}
  from sklearn import metrics
  out = {"accuracy": float(np.mean((y_pred >= 0.5) == (y_true > 0.5)))}
  out["auc"] = (float(metrics.roc_auc_score(y_true, y_pred))
                if len(np.unique(y_true)) == 2 else float("nan"))
  p = np.clip(y_pred, 1e-7, 1 - 1e-7)
  out["logloss"] = float(-np.mean(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)))
  return out


class FittedHead:
  """A fitted head with everything needed to apply it to a new feature file."""

  def __init__(self, config: HeadConfig, model, id_encoder: Optional[IdTargetEncoder],
               vector_dims: Mapping[str, int], clip: Optional[Tuple[float, float]]):
    self.config = config
    self.model = model
    self.id_encoder = id_encoder
    self.vector_dims = dict(vector_dims)  # the feature schema this head expects
    self.clip = clip
    self.metrics: Dict[str, Any] = {}

  def predict(self, data: SplitData) -> np.ndarray:
    """Ratings [N] (clipped to the training range) or P(yes) [N]."""
    for name, dim in self.vector_dims.items():
      got = data.vectors.get(name)
      if got is None or got.shape[1] != dim:
        raise SchemaMismatchError(
            f"head was fitted on column {name!r} float32[{dim}], features have "
            f"{None if got is None else f'float32[{got.shape[1]}]'}")
    x = design_matrix(data, self.inputs, self.id_encoder)
    if isinstance(self.model, MLPHead):
      y = self.model.predict(x)
    elif self.config.target == "click":
      y = self.model.predict_proba(x)[:, 1]
    else:
      y = self.model.predict(x)
    return np.clip(y, *self.clip) if self.clip else y

  @property
  def inputs(self) -> Tuple[str, ...]:
    return self.config.inputs

  def save(self, directory: str) -> None:
    """Writes the model file(s), then `head.json` (its presence marks a complete head)."""
    import joblib
    os.makedirs(directory, exist_ok=True)
    if isinstance(self.model, MLPHead):
      self.model.save(directory)
    else:
      _atomic_write(directory, "model.joblib", lambda f: joblib.dump(self.model, f),
                    binary=True)
    if self.id_encoder is not None:
      _atomic_write(directory, "id_encoder.joblib",
                    lambda f: joblib.dump(self.id_encoder, f), binary=True)
    meta = {"config": _config_to_dict(self.config), "vector_columns": self.vector_dims,
            "clip": self.clip, "metrics": self.metrics}
    _atomic_write(directory, "head.json", lambda f: json.dump(meta, f, indent=2, sort_keys=True))

  @classmethod
  def load(cls, directory: str) -> "FittedHead":
    import joblib
    with open(os.path.join(directory, "head.json")) as f:
      meta = json.load(f)
    c = dict(meta["config"])
    c["mlp"] = MLPConfig(**{**c["mlp"], "hidden": tuple(c["mlp"]["hidden"])})
    c["inputs"] = tuple(c["inputs"])
    config = HeadConfig(**c)
    if config.head == "mlp":
      model = MLPHead.load(directory, config.target, config.mlp)
    else:
      model = joblib.load(os.path.join(directory, "model.joblib"))
    enc_path = os.path.join(directory, "id_encoder.joblib")
    enc = joblib.load(enc_path) if os.path.exists(enc_path) else None
    head = cls(config, model, enc, meta["vector_columns"],
               tuple(meta["clip"]) if meta["clip"] else None)
    head.metrics = meta["metrics"]
    return head


def _config_to_dict(config: HeadConfig) -> Dict[str, Any]:
  d = dataclasses.asdict(config)
  d["inputs"] = list(config.inputs)
  return d


def _atomic_write(directory: str, name: str, write_fn, binary: bool = False) -> str:
  """Writes `directory/name` through a temp file + rename."""
  fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=directory)
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write_fn(f)
    path = os.path.join(directory, name)
    os.replace(tmp, path)
    return path
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _split_targets(data: SplitData, target: str, split: str, path: str) -> np.ndarray:
  if target not in data.targets:
    raise MissingTargetError(
        f"{path}: target {target!r} needs column "
        f"{features_lib.TARGET_COLUMNS[target]!r}, which the file does not have")
  y = data.targets[target]
  bad = np.isnan(y)
  if bad.any():
    raise MissingTargetError(
        f"{path}: column {features_lib.TARGET_COLUMNS[target]!r} is null in "
        f"{int(bad.sum())} of {len(y)} rows of split {split!r}; export a task whose "
        f"targets are {'ratings' if target == 'rating' else 'yes/no'}")
  return y


def _get_split(splits: Mapping[str, SplitData], name: str, path: str) -> SplitData:
  data = splits.get(name)
  if data is None or len(data) == 0:
    raise EmptySplitError(
        f"{path}: split {name!r} (column 'split') has no rows; the file has "
        f"{ {k: len(v) for k, v in splits.items()} }")
  return data


def _holdout(n: int, seed: int, fraction: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
  perm = np.random.default_rng(seed).permutation(n)
  k = max(1, int(round(n * fraction)))
  return np.sort(perm[k:]), np.sort(perm[:k])


def _subset(data: SplitData, idx: np.ndarray) -> SplitData:
  return SplitData({k: v[idx] for k, v in data.vectors.items()}, data.user_ids[idx],
                   data.item_ids[idx], {k: v[idx] for k, v in data.targets.items()},
                   {k: v[idx] for k, v in data.scores.items()})


def fit_head(path: str, config: HeadConfig, splits=None, schema=None) -> FittedHead:
  """Fits `config.head` on a feature file's train split; metrics on its eval split.

  Raises one of the `HeadError` subclasses, naming the file, split and column,
  on schema mismatch, missing targets, NaN features or an empty split.
  """
  if config.head not in HEADS:
    raise HeadError(f"unknown head {config.head!r}; choose from {HEADS}")
  if config.target not in TARGETS:
    raise HeadError(f"unknown target {config.target!r}; choose from {TARGETS}")
  if config.target not in _HEAD_TARGETS.get(config.head, TARGETS):
    raise HeadError(f"head {config.head!r} predicts {_HEAD_TARGETS[config.head]}, "
                    f"not {config.target!r}")
  if schema is None:
    schema = _read_schema(path)
  inputs = tuple(config.inputs) or tuple(schema.vector_columns)
  if not inputs:
    raise SchemaMismatchError(f"{path}: no inputs selected and no vector columns")
  config = dataclasses.replace(config, inputs=inputs)
  vector_cols = [c for c in inputs if c != ID_INPUT]
  if splits is None:
    schema, splits = load_features(path, vector_cols)
  train = _get_split(splits, config.train_split, path)
  test = _get_split(splits, config.eval_split, path)
  y_train = _split_targets(train, config.target, config.train_split, path)
  y_test = _split_targets(test, config.target, config.eval_split, path)
  if config.target == "click" and len(np.unique(y_train)) < 2:
    raise HeadError(f"{path}: column 'label' of split {config.train_split!r} has one "
                    "class only; a click head needs both yes and no examples")

  val = splits.get(config.validation_split)
  if config.head == "mlp" and (val is None or len(val) == 0):
    # No validation split in the file: early-stop on a fixed 10% of train.
    fit_idx, val_idx = _holdout(len(train), config.seed)
    train, val = _subset(train, fit_idx), _subset(train, val_idx)
    y_train, y_val = y_train[fit_idx], y_train[val_idx]
  elif val is not None and len(val):
    y_val = _split_targets(val, config.target, config.validation_split, path)

  id_encoder = None
  if ID_INPUT in inputs:
    id_encoder = IdTargetEncoder().fit(train.user_ids, train.item_ids, y_train)
  x_train = design_matrix(train, inputs, id_encoder, y_for_loo=y_train)

  if config.head == "mlp":
    x_val = design_matrix(val, inputs, id_encoder)
    model = MLPHead(config.target, dataclasses.replace(config.mlp, seed=config.seed))
    model.fit(x_train, y_train, x_val, y_val)
  else:
    model = make_sklearn_model(config.head, config.target, config.seed)
    model.fit(x_train, y_train.astype(np.int64) if config.target == "click" else y_train)

  clip = (float(y_train.min()), float(y_train.max())) if config.target == "rating" else None
  head = FittedHead(config, model, id_encoder,
                    {c: int(train.vectors[c].shape[1]) for c in vector_cols}, clip)
  head.metrics = dict(metrics_for(config.target, y_test, head.predict(test)),
                      head=config.head, target=config.target, inputs="+".join(inputs),
                      split=config.eval_split, n_train=len(train), n_eval=len(test))
  if isinstance(model, MLPHead):
    head.metrics.update(best_epoch=model.best_epoch_, epochs_run=model.epochs_run_)
  return head


# ----------------------------------------------------------------------------
# Generation results and the side-by-side table.


def score_rows(splits: Mapping[str, SplitData], split: str = "test") -> List[Dict[str, Any]]:
  """Rows for scores stored in the feature file (yes/no by `score_batch`)."""
  rows = []
  data = splits.get(split)
  if data is not None and "click" in data.scores and "click" in data.targets:
    y, logit = data.targets["click"], data.scores["click"]
    ok = ~np.isnan(y) & ~np.isnan(logit)
    if ok.any():
      m = metrics_for("click", y[ok], 1.0 / (1.0 + np.exp(-logit[ok])))
      rows.append(dict(m, method="generation (score_batch yes vs no)", target="click",
                       split=split, n_eval=int(ok.sum())))
  return rows


_METRIC_KEYS = ("rmse", "mae", "auc", "accuracy")


def _metric_value(v):
  if isinstance(v, Mapping):
    v = v.get("value", v.get("score"))
  return float(v) if isinstance(v, (int, float)) else None


def generation_rows(path: str, label: str = "generation") -> List[Dict[str, Any]]:
  """Reads generative results: a metrics JSON/JSONL, or a predictions JSONL.

  Metrics files: the ``results.json`` of ``p5jax.eval`` / ``p5jax.main`` (one
  row per prompt task), or a JSON object (or JSONL lines, last line wins per
  task) with any of rmse/mae/auc/accuracy as numbers or {"value": x},
  optionally nested per task name. Prediction files: JSONL lines with "prediction" and "target" (strings or
  numbers); RMSE/MAE are computed over rows whose prediction parses as a number,
  and the count of unparsable predictions is reported.
  """
  with open(path) as f:
    text = f.read()
  try:
    records = [json.loads(text)]
  except json.JSONDecodeError:
    records = [json.loads(l) for l in text.splitlines() if l.strip()]
  if records and isinstance(records[0], list):
    records = records[0]
  if records and all("prediction" in r and "target" in r for r in records):
    pred, gold, invalid = [], [], 0
    for r in records:
      p, _ = features_lib.parse_target(str(r["prediction"]))
      g, _ = features_lib.parse_target(str(r["target"]))
      if g is None:
        continue
      if p is None:
        invalid += 1
        continue
      pred.append(p)
      gold.append(g)
    if not gold:
      raise HeadError(f"{path}: no prediction/target pairs with numeric targets")
    return [dict(metrics_for("rating", gold, pred), method=label, target="rating",
                 n_eval=len(gold), invalid=invalid)]
  if len(records) == 1 and isinstance(records[0].get("rows"), list):
    # results.json of p5jax.eval / p5jax.main: one row per prompt task, with
    # accuracy/AUC in percent (SeqIO's convention); heads use fractions.
    records = [{r.get("task", f"row {i}"): {
        **r, **{k: r[k] / 100.0 for k in ("accuracy", "auc")
                if isinstance(r.get(k), (int, float))}}
                for i, r in enumerate(records[0]["rows"]) if isinstance(r, Mapping)}]
  rows = {}
  for rec in records:
    nested = {k: v for k, v in rec.items() if isinstance(v, Mapping)
              and any(m in v for m in _METRIC_KEYS)}
    for name, vals in (nested.items() if nested else [("", rec)]):
      got = {m: _metric_value(vals[m]) for m in _METRIC_KEYS if m in vals}
      got = {k: v for k, v in got.items() if v is not None}
      if got:
        rows[name] = dict(got, method=f"{label} {name}".strip(),
                          target="rating" if "rmse" in got or "mae" in got else "click")
        if isinstance(vals.get("examples"), int):
          rows[name]["n_eval"] = vals["examples"]
  if not rows:
    raise HeadError(f"{path}: no rmse/mae/auc/accuracy values found")
  return list(rows.values())


def compare_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown table: one line per method, rating and click metrics side by side."""
  cols = ["method", "target", "rmse", "mae", "auc", "accuracy", "n_eval"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = []
    for c in cols:
      v = r.get(c, "")
      cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def compare(path: str, target: str, heads: Sequence[str],
            generation: Sequence[str] = (), seed: int = 0,
            mlp: MLPConfig = MLPConfig()) -> List[Dict[str, Any]]:
  """Fits every head on embeddings and on the ID baseline; adds generation rows."""
  schema, splits = load_features(path)
  rows: List[Dict[str, Any]] = []
  for g in generation:
    rows += [r for r in generation_rows(g) if r["target"] == target]
  if target == "click":
    rows += score_rows(splits)
  embed_inputs = tuple(schema.vector_columns)
  for inputs, tag in ((embed_inputs, "P5 features"), ((ID_INPUT,), "ID baseline")):
    for head in heads:
      if target not in _HEAD_TARGETS.get(head, TARGETS) or (head == "mean" and tag != "P5 features"):
        continue
      fitted = fit_head(path, HeadConfig(head=head, target=target, inputs=inputs,
                                         seed=seed, mlp=mlp), splits=splits, schema=schema)
      rows.append(dict(fitted.metrics, method="training mean" if head == "mean"
                       else f"{head} on {tag}"))
  return rows
