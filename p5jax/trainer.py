"""Compiled train/eval steps and the metric logging around them (T5X `trainer.py`).

`Trainer` owns three compiled functions, all built by `Partitioner.partition`
so every sharding comes from the logical axis rules:

* ``train_step(state, batch, rng) -> (state, metrics)``: dropout rng folded with
  ``state.step`` (so a resumed run draws the same masks), optional gradient
  accumulation over ``num_microbatches`` with `lax.scan`, the state donated.
* ``eval_step(params, batch) -> metrics``: teacher-forced loss/accuracy.

Host side, `Trainer.train` feeds per-host numpy batches, keeps the per-step
metric arrays on device and fetches them only every ``log_every_steps`` (no
per-step host sync), then writes loss, accuracy, learning rate, grad norm,
examples/s and tokens/s (non-padding input + target tokens) through a clu
metric writer (TensorBoard events + log lines), with a tqdm bar when stderr
is a terminal.

The model follows T5X's ``BaseModel`` contract:
``model.loss_fn(params, batch, dropout_rng) -> (loss, metrics)`` where
``metrics`` maps names to scalars or `clu.metrics.Metric`s.
"""
import dataclasses
import functools
import logging
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import clu.metrics
import jax
import jax.numpy as jnp
import numpy as np
import optax

from p5jax import optimizers as optimizers_lib
from p5jax import partitioning
from p5jax import train_state as train_state_lib

Batch = Mapping[str, np.ndarray]
MetricsDict = Dict[str, Any]

# Host-counted token features: encoder inputs and decoder targets (0 = padding).
_TOKEN_FEATURES = ("encoder_input_tokens", "decoder_target_tokens")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """Options of the training loop.

  Attributes:
    num_microbatches: split each batch into this many microbatches and
      accumulate their gradients in a `lax.scan` (None/1 = no accumulation).
    microbatch_weighting: how microbatch losses/grads combine so that the
      step equals the big-batch step: ``"sum"`` (loss summed over tokens or
      divided by a constant), ``"mean"`` (divided by a per-microbatch size
      such as the number of sequences), ``"tokens"`` (divided by the number of
      real target tokens: weight = the microbatch's share of
      ``decoder_loss_weights``). None infers it from the model's T5X
      ``loss_normalizing_factor``.
    log_every_steps: fetch metrics from device and write them every N steps.
    dropout_rng_impl: PRNG implementation of the dropout key (None = JAX's
      default, threefry: identical masks under any sharding). ``"rbg"`` is
      T5X's ``use_hardware_rng``: faster on TPU and about half the compile
      time on CPU, but its masks depend on the sharding.
  """
  num_microbatches: Optional[int] = None
  microbatch_weighting: Optional[str] = None
  log_every_steps: int = 50
  dropout_rng_impl: Optional[str] = None


MICROBATCH_WEIGHTINGS = ("sum", "mean", "tokens")


def infer_microbatch_weighting(model) -> str:
  """Microbatch weighting matching a T5X ``loss_normalizing_factor``.

  None or a constant -> "sum"; ``NUM_REAL_TARGET_TOKENS`` -> "tokens";
  ``NUM_TOTAL_TARGET_TOKENS`` / ``AVERAGE_PER_SEQUENCE`` -> "mean".
  """
  factor = getattr(model, "_loss_normalizing_factor",
                   getattr(model, "loss_normalizing_factor", None))
  if factor is None or isinstance(factor, (int, float)):
    return "sum"
  name = str(getattr(factor, "name", factor)).upper()
  if name == "NUM_REAL_TARGET_TOKENS":
    return "tokens"
  if name in ("NUM_TOTAL_TARGET_TOKENS", "AVERAGE_PER_SEQUENCE"):
    return "mean"
  raise ValueError(f"cannot infer microbatch weighting for loss_normalizing_factor={factor!r}; "
                   f"set TrainerConfig.microbatch_weighting to one of {MICROBATCH_WEIGHTINGS}")


def count_tokens(batch: Batch) -> int:
  """Non-padding input + target tokens of a host batch (numpy; no device sync)."""
  return int(sum(np.count_nonzero(batch[k]) for k in _TOKEN_FEATURES if k in batch))


def _batch_size(batch: Batch) -> int:
  return int(next(iter(batch.values())).shape[0])


def reduce_metrics(steps: List[MetricsDict]) -> Dict[str, float]:
  """Host-side reduction of per-step metric dicts: scalars averaged, clu merged."""
  out = {}
  for name in steps[0]:
    values = [m[name] for m in steps]
    if isinstance(values[0], clu.metrics.Metric):
      out[name] = float(functools.reduce(lambda a, b: a.merge(b), values).compute())
    else:
      out[name] = float(np.mean([np.asarray(v, np.float64) for v in values]))
  return out


def _sum_metric_trees(a: MetricsDict, b: MetricsDict) -> MetricsDict:
  return {k: (a[k].merge(b[k]) if isinstance(a[k], clu.metrics.Metric) else a[k] + b[k])
          for k in a}


class ProgressBar:
  """tqdm on interactive terminals, nothing otherwise (log lines suffice)."""

  def __init__(self, total: int, initial: int):
    self._bar = None
    if sys.stderr.isatty():
      try:
        import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
      except ImportError:
        pass

  def update(self, n: int = 1, postfix: Optional[Mapping[str, float]] = None):
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()


class Trainer:
  """Compiled steps + logging for one model/optimizer/partitioner triple.

  Args:
    model: T5X-style model (``loss_fn(params, batch, dropout_rng)``).
    optimizer: `optimizers.Optimizer` (optax transformation + lr schedule).
    partitioner: `partitioning.Partitioner`.
    state_axes: mesh `PartitionSpec` tree of the `TrainState` (see
      `train.create_train_state`).
    config: `TrainerConfig`.
    summary_dir: where TensorBoard events go (None = log lines only).
    rng_seed: base dropout seed; step ``s`` uses ``fold_in(key(seed), s)``.
  """

  def __init__(self, model, optimizer: optimizers_lib.Optimizer,
               partitioner: partitioning.Partitioner, state_axes: Any,
               config: TrainerConfig = TrainerConfig(),
               summary_dir: Optional[str] = None, rng_seed: int = 0,
               writer=None):
    self.model = model
    self.optimizer = optimizers_lib.as_optimizer(optimizer)
    self.partitioner = partitioner
    self.state_axes = state_axes
    self.config = config
    self._rng = jax.random.key(rng_seed, impl=config.dropout_rng_impl)
    self._num_data_shards = partitioner.get_data_layout().num_shards
    self._microbatch_weighting = config.microbatch_weighting or infer_microbatch_weighting(model)
    if self._microbatch_weighting not in MICROBATCH_WEIGHTINGS:
      raise ValueError(f"TrainerConfig.microbatch_weighting={config.microbatch_weighting!r}; "
                       f"use one of {MICROBATCH_WEIGHTINGS}")
    self._compiled_train = {}
    self._compiled_eval = {}
    if writer is None:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      writer = metric_writers.create_default_writer(
          summary_dir, just_logging=summary_dir is None or jax.process_index() > 0,
          asynchronous=True)
    self.writer = writer

  # -- compiled steps ----------------------------------------------------------
  def _loss_and_grads(self, params, batch, dropout_rng):
    """(loss, metrics), grads for one batch, microbatched if configured."""
    grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
    n = self.config.num_microbatches or 1
    if n <= 1:
      return grad_fn(params, batch, dropout_rng)
    batch_size = _batch_size(batch)
    if batch_size % n:
      raise ValueError(f"batch size {batch_size} is not divisible by num_microbatches={n}")
    # [B, ...] -> [n, B/n, ...]; microbatch i = rows i*B/n .. (i+1)*B/n - 1.
    micro = jax.tree_util.tree_map(lambda x: x.reshape((n, batch_size // n) + x.shape[1:]), batch)
    if self._microbatch_weighting == "tokens":
      mask = micro.get("decoder_loss_weights", micro["decoder_target_tokens"] > 0)
      tokens = jnp.sum(mask.reshape(n, -1).astype(jnp.float32), axis=1)
      weights = tokens / jnp.maximum(jnp.sum(tokens), 1e-8)
    elif self._microbatch_weighting == "mean":
      weights = jnp.full((n,), 1.0 / n, jnp.float32)
    else:
      weights = jnp.ones((n,), jnp.float32)

    def body(carry, xs):
      i, mbatch, w = xs
      (loss, metrics), grads = grad_fn(params, mbatch, jax.random.fold_in(dropout_rng, i))
      loss_acc, metrics_acc, grads_acc = carry
      grads_acc = jax.tree_util.tree_map(lambda a, g: a + w * g, grads_acc, grads)
      return (loss_acc + w * loss, _sum_metric_trees(metrics_acc, metrics), grads_acc), None

    # Zero accumulators shaped like one microbatch's outputs (clu metrics are
    # flax structs of counts/totals, so zeros are their identity for merge).
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    (_, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, first, dropout_rng)
    zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = (jnp.zeros((), jnp.float32), zeros(metrics_shape), zeros(grads_shape))
    (loss, metrics, grads), _ = jax.lax.scan(body, init, (jnp.arange(n), micro, weights))
    # Scalars summed over microbatches -> mean; clu metrics merged already.
    metrics = {k: (v if isinstance(v, clu.metrics.Metric) else v / n) for k, v in metrics.items()}
    return (loss, metrics), grads

  def _train_step(self, state: train_state_lib.TrainState, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = self._loss_and_grads(state.params, batch, dropout_rng)
    new_state = state.apply_gradient(grads)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["learning_rate"] = jnp.asarray(self.optimizer.learning_rate_fn(state.step), jnp.float32)
    metrics["grad_norm"] = optax.global_norm(grads)
    return new_state, metrics

  def _eval_step(self, params, batch):
    loss, metrics = self.model.loss_fn(params, batch, None)
    metrics = dict(metrics)
    metrics["loss"] = loss
    return metrics

  def _batch_axes(self, batch: Batch):
    spec = self.partitioner.data_partition_spec
    return {k: spec for k in batch}

  def compiled_train_step(self, batch: Batch) -> Callable:
    """The partitioned train step for batches with this structure/shape."""
    key = tuple(sorted((k, v.shape) for k, v in batch.items()))
    if key not in self._compiled_train:
      self._compiled_train[key] = self.partitioner.partition(
          self._train_step,
          in_axis_resources=(self.state_axes, self._batch_axes(batch), None),
          out_axis_resources=(self.state_axes, None),
          donate_argnums=(0,))
    return self._compiled_train[key]

  def compiled_eval_step(self, batch: Batch) -> Callable:
    key = tuple(sorted((k, v.shape) for k, v in batch.items()))
    if key not in self._compiled_eval:
      self._compiled_eval[key] = self.partitioner.partition(
          self._eval_step,
          in_axis_resources=(self.state_axes.params, self._batch_axes(batch)),
          out_axis_resources=None)
    return self._compiled_eval[key]

  # -- loops -------------------------------------------------------------------
  def train(self, state: train_state_lib.TrainState, batches: Iterator[Batch], num_steps: int,
            stop_requested: Callable[[], bool] = lambda: False,
            progress: Optional[ProgressBar] = None
            ) -> Tuple[train_state_lib.TrainState, Optional[Dict[str, float]], int]:
    """Runs up to `num_steps` train steps on host batches from `batches`.

    Args:
      state: the current train state (donated: do not reuse it afterwards).
      batches: iterator of per-host numpy batches; one is consumed per step.
      num_steps: steps to run.
      stop_requested: polled between steps (SIGTERM); True ends the loop early.
      progress: optional progress bar updated per step.

    Returns:
      (new state, last logged metrics or None, steps actually run).
    """
    pending: List[MetricsDict] = []
    examples = tokens = 0
    t0 = time.perf_counter()
    last = None
    host_step = None
    steps_run = 0
    for _ in range(num_steps):
      if stop_requested():
        break
      try:
        host_batch = next(batches)
      except StopIteration:
        logging.warning("training data exhausted after %d steps", steps_run)
        break
      # Per-host counts scaled to the global batch (hosts read equal shards).
      examples += _batch_size(host_batch) * self._num_data_shards
      tokens += count_tokens(host_batch) * self._num_data_shards
      step_fn = self.compiled_train_step(host_batch)
      if host_step is None:
        host_step = int(jax.device_get(state.step))  # once per call, not per step
      state, metrics = step_fn(state, self.partitioner.host_local_to_global(host_batch),
                               self._rng)
      pending.append(metrics)
      host_step += 1
      steps_run += 1
      if progress is not None:
        progress.update(1)
      if host_step % self.config.log_every_steps == 0:
        last = self._write_train_metrics(host_step, pending, examples, tokens, t0, progress)
        pending, examples, tokens, t0 = [], 0, 0, time.perf_counter()
    if pending:
      last = self._write_train_metrics(host_step, pending, examples, tokens, t0, progress)
    return state, last, steps_run

  def _write_train_metrics(self, step, pending, examples, tokens, t0, progress):
    values = reduce_metrics(jax.device_get(pending))  # the only host sync
    seconds = max(time.perf_counter() - t0, 1e-9)
    values["timing/steps_per_second"] = len(pending) / seconds
    values["timing/examples_per_second"] = examples / seconds
    values["timing/tokens_per_second"] = tokens / seconds
    self.writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
    if progress is not None:
      progress.update(0, {k: values[k] for k in ("loss", "accuracy") if k in values})
    return values

  def evaluate(self, params: Any, batches: Iterator[Batch], step: int,
               prefix: str = "train_eval") -> Dict[str, float]:
    """Teacher-forced metrics over all `batches` (averaged per batch)."""
    collected = []
    for host_batch in batches:
      fn = self.compiled_eval_step(host_batch)
      collected.append(fn(params, self.partitioner.host_local_to_global(host_batch)))
    if not collected:
      logging.warning("evaluation dataset %s is empty", prefix)
      return {}
    values = reduce_metrics(jax.device_get(collected))
    self.writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in values.items()})
    return values

  def close(self):
    self.writer.flush()
    self.writer.close()
