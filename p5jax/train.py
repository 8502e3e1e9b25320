r"""Pretraining / fine-tuning entry point (replaces ``t5x.train``).

``train(...)`` is keyword-only and configured by gin, like T5X::

  python -m p5jax.train \
    --gin_file=gin/experiments/ml100k_tiny.gin \
    --gin.MODEL_DIR="'/tmp/p5_tiny'"

What one call does:

1. builds the SeqIO training pipeline for this host (`utils.get_dataset`,
   sharded by `Partitioner.get_data_layout`);
2. creates the sharded `TrainState` (or restores it: the latest checkpoint in
   ``model_dir`` first -- resuming after preemption -- else
   ``checkpoint_cfg.restore``, e.g. pretrained params for fine-tuning);
3. runs compiled train steps (`trainer.Trainer`), saving every
   ``checkpoint_cfg.save.period`` steps (with the data position), evaluating
   teacher-forced every ``eval_period`` steps and running the pluggable
   inference evaluator (`inference_evaluator_cls`);
4. on SIGTERM: saves and returns early.

``--gin.DRY_RUN=True`` only parses the config and builds its mesh (`dry_run`),
e.g. to check a pod config on CPU with a faked device count.
"""
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from p5jax import checkpoints
from p5jax import gin_utils
from p5jax import optimizers as optimizers_lib
from p5jax import partitioning
from p5jax import train_state as train_state_lib
from p5jax import trainer as trainer_lib
from p5jax import utils
from p5jax.data import schema

PartitionSpec = partitioning.PartitionSpec


class TrainConfigError(ValueError):
  """An inconsistent `train(...)` configuration (names the argument)."""


# -- train state ---------------------------------------------------------------------
def _as_dict(variables) -> Dict[str, Any]:
  return dict(variables.unfreeze() if hasattr(variables, "unfreeze") else variables)


def model_input_shapes(ds) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Any]]:
  """Feature shapes and dtypes of a batched dataset (for `get_initial_variables`)."""
  spec = ds.element_spec
  shapes = {k: tuple(v.shape) for k, v in spec.items()}
  types = {k: jnp.dtype(v.dtype.as_numpy_dtype) for k, v in spec.items()}
  return shapes, types


def create_train_state(model, optimizer: optimizers_lib.Optimizer,
                       partitioner: partitioning.Partitioner,
                       input_shapes: Mapping[str, Tuple[int, ...]],
                       input_types: Optional[Mapping[str, Any]] = None,
                       init_rng: Optional[jax.Array] = None,
                       ) -> Tuple[Callable, train_state_lib.TrainState, train_state_lib.TrainState]:
  """The sharded train-state initializer, its abstract shapes and its mesh axes.

  Parameter specs come from the model's logical axis names (flax boxed
  variables); optimizer specs follow them (`Partitioner.opt_state_mesh_axes`).

  Returns:
    (init_fn, abstract_state, state_axes): ``init_fn(rng)`` builds the state
    directly in its sharded layout (compiled, nothing lands on one device
    first); ``abstract_state`` is a `TrainState` of `jax.ShapeDtypeStruct`s
    with shardings (the restore target); ``state_axes`` is a `TrainState` of
    mesh `PartitionSpec`s.
  """
  tx = optimizer.tx

  def init_boxed(rng):
    return _as_dict(model.get_initial_variables(rng, input_shapes, input_types))["params"]

  rng0 = jax.random.key(0) if init_rng is None else init_rng
  boxed_shapes = jax.eval_shape(init_boxed, rng0)
  params_axes = partitioner.params_mesh_axes(boxed_shapes)
  params_shapes = partitioning.unbox(boxed_shapes)
  opt_axes = partitioner.opt_state_mesh_axes(tx, params_shapes, params_axes)
  axes = train_state_lib.TrainState(step=PartitionSpec(), params=params_axes,
                                    opt_state=opt_axes, tx=tx)

  def init_fn(rng):
    return train_state_lib.TrainState.create(partitioning.unbox(init_boxed(rng)), tx)

  init = partitioner.partition(init_fn, in_axis_resources=None, out_axis_resources=axes)
  with partitioner.rules_context():
    shapes = jax.eval_shape(init_fn, rng0)
  shardings = partitioner.to_shardings(axes)
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return init, abstract, axes


# -- inference evaluation hook --------------------------------------------------------
class SeqioInferenceEvaluator:
  """Inference eval through `seqio.Evaluator` with the model's decoding.

  The hook `train` calls as ``evaluator.evaluate(step=..., params=...)``; any
  class with this constructor and method can replace it via
  ``train.inference_evaluator_cls`` in gin.

  Args:
    infer_eval_dataset_cfg: which task/mixture/split to decode.
    model: T5X-style model (``predict_batch_with_aux``, ``score_batch``).
    partitioner: the run's partitioner.
    params_axes: mesh axes of the parameters.
    log_dir: where seqio's loggers write (TensorBoard/JSON).
    decoder_params: extra ``decoder_params`` for ``predict_batch_with_aux``
      (e.g. beam size, item-trie constraint).
  """

  def __init__(self, *, infer_eval_dataset_cfg: utils.DatasetConfig, model,
               partitioner: partitioning.Partitioner, params_axes: Any,
               log_dir: Optional[str] = None,
               decoder_params: Optional[Mapping[str, Any]] = None):
    cfg = infer_eval_dataset_cfg
    utils.import_module(cfg.module)
    utils.get_mixture_or_task(cfg.mixture_or_task_name)
    self._cfg = cfg
    self._model = model
    self._partitioner = partitioner
    layout = partitioner.get_data_layout(cfg.batch_size)
    self._batch_size = layout.per_host_batch_size
    loggers = (seqio.TensorBoardLoggerV1, seqio.JSONLogger) if log_dir else ()
    self._evaluator = seqio.Evaluator(
        mixture_or_task_name=cfg.mixture_or_task_name,
        feature_converter=utils.feature_converter_cls_for(model)(pack=False),
        eval_split=cfg.split, use_cached=cfg.use_cached, seed=cfg.seed,
        sequence_length=cfg.task_feature_lengths, log_dir=log_dir, logger_cls=loggers,
        use_memory_cache=cfg.use_memory_cache)
    data_axes = partitioner.data_partition_spec
    decoder_params = dict(decoder_params or {})

    def predict(params, batch):
      return model.predict_batch_with_aux(params, batch, decoder_params=decoder_params or None)

    self._predict = partitioner.partition(
        predict, in_axis_resources=(params_axes, data_axes), out_axis_resources=None)
    self._score = partitioner.partition(
        model.score_batch, in_axis_resources=(params_axes, data_axes), out_axis_resources=None)
    self._params = None

  def _batches(self, ds):
    """(indices, padded host batch, number of real rows) from an (index, features) ds."""
    for chunk in ds.batch(self._batch_size).as_numpy_iterator():
      indices, features = chunk
      n = len(indices)
      padded = {k: np.pad(v, [(0, self._batch_size - n)] + [(0, 0)] * (v.ndim - 1))
                for k, v in features.items()}
      yield indices, padded, n

  def _predict_fn(self, ds, model_feature_shapes=None):  # pylint: disable=unused-argument
    out, aux_all = [], {}
    for indices, batch, n in self._batches(ds):
      tokens, aux = jax.device_get(self._predict(
          self._params, self._partitioner.host_local_to_global(batch)))
      out.extend((int(i), t.tolist()) for i, t in zip(indices, tokens[:n]))
      for k, v in aux.items():
        aux_all.setdefault(k, []).extend(np.asarray(v)[:n].tolist())
    return out, aux_all

  def _score_fn(self, ds, model_feature_shapes=None):  # pylint: disable=unused-argument
    out = []
    for indices, batch, n in self._batches(ds):
      scores = jax.device_get(self._score(
          self._params, self._partitioner.host_local_to_global(batch)))
      out.extend((int(i), float(s)) for i, s in zip(indices, np.asarray(scores)[:n]))
    return out

  def evaluate(self, *, step: int, params: Any) -> Mapping[str, Any]:
    self._params = params
    metrics, _ = self._evaluator.evaluate(
        compute_metrics=jax.process_index() == 0, step=step,
        predict_with_aux_fn=self._predict_fn, score_fn=self._score_fn)
    result = metrics.result() if hasattr(metrics, "result") else metrics
    self._params = None
    return result


# -- the loop ----------------------------------------------------------------------------
def train_rngs(random_seed: int) -> Tuple[jax.Array, int]:
  """(parameter-init key, dropout seed) that `train` derives from ``random_seed``.

  Public so that a hand-built `trainer.Trainer` can reproduce a `train` run
  exactly (e.g. the multi-process equivalence test).
  """
  init_rng, dropout_key = jax.random.split(jax.random.key(random_seed))
  return init_rng, int(jax.random.randint(dropout_key, (), 0, 2**31 - 1))


def _data_position(cfg: utils.DatasetConfig, batches_consumed: int) -> Dict[str, Any]:
  return {"batches_consumed": int(batches_consumed),
          "mixture_or_task_name": cfg.mixture_or_task_name,
          "split": cfg.split, "seed": cfg.seed, "batch_size": cfg.batch_size}


def _batches_to_skip(position: Optional[Mapping[str, Any]], cfg: utils.DatasetConfig) -> int:
  if not position:
    return 0
  same = all(position.get(k) == v for k, v in _data_position(cfg, 0).items()
             if k != "batches_consumed")
  if not same:
    logging.warning("the training data config changed since the checkpoint (%s); the new "
                    "dataset starts from its beginning", position)
    return 0
  return int(position["batches_consumed"])


def train(
    *,
    model,
    train_dataset_cfg: utils.DatasetConfig,
    model_dir: str,
    total_steps: int,
    train_eval_dataset_cfg: Optional[utils.DatasetConfig] = None,
    infer_eval_dataset_cfg: Optional[utils.DatasetConfig] = None,
    checkpoint_cfg: checkpoints.CheckpointConfig = checkpoints.CheckpointConfig(),
    partitioner: Optional[partitioning.Partitioner] = None,
    optimizer: Optional[optimizers_lib.Optimizer] = None,
    trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig(),
    eval_period: int = 1000,
    eval_steps: Optional[int] = None,
    random_seed: int = 0,
    inference_evaluator_cls: Optional[Callable[..., Any]] = SeqioInferenceEvaluator,
    run_eval_before_training: bool = False,
    summarize_config_fn: Optional[Callable[[str, Any, int], None]] = None,
    data_dir: Optional[str] = None,
    param_init_fn: Optional[Callable[[Any, Any], Any]] = None,
) -> Tuple[int, train_state_lib.TrainState]:
  """Trains `model` to `total_steps` (T5X `train.train`, keyword-only).

  Args:
    model: T5X-style model (``get_initial_variables``, ``loss_fn``; for
      inference eval ``predict_batch_with_aux``/``score_batch``).
    train_dataset_cfg: the training pipeline (global batch size).
    model_dir: checkpoints and TensorBoard events go here.
    total_steps: train until ``state.step == total_steps`` (resumes count).
    train_eval_dataset_cfg: teacher-forced eval data (None = no such eval).
    infer_eval_dataset_cfg: decoding eval data (None = no inference eval).
    checkpoint_cfg: save period/keep and what to restore when starting fresh.
    partitioner: mesh and sharding rules (default: all devices data-parallel).
    optimizer: `optimizers.Optimizer`; default ``model.optimizer_def``.
    trainer_config: microbatching and logging cadence.
    eval_period: evaluate every this many steps (and at the end).
    eval_steps: number of teacher-forced eval batches (None = the whole split).
    random_seed: parameter init and dropout seed.
    inference_evaluator_cls: constructor of the inference-eval hook (see
      `SeqioInferenceEvaluator`); None disables inference eval.
    run_eval_before_training: also evaluate at the starting step.
    summarize_config_fn: called as ``fn(model_dir, summary_writer, step)``
      (e.g. `gin_utils.summarize_gin_config`).
    data_dir: root of the prepared data (`p5jax.data.schema.set_data_root`);
      None keeps ``$P5JAX_DATA_DIR`` / the default.
    param_init_fn: ``fn(params, model) -> params`` applied once to freshly
      initialised parameters (never to restored ones), e.g.
      `p5jax.item_init.CooccurrenceInit`.

  Returns:
    (final step, final train state).
  """
  if total_steps <= 0:
    raise TrainConfigError(f"total_steps must be positive, got {total_steps}")
  if eval_period <= 0:
    raise TrainConfigError(f"eval_period must be positive, got {eval_period}")
  if data_dir:
    schema.set_data_root(data_dir)
  partitioner = partitioner or partitioning.Partitioner()
  optimizer = optimizer or getattr(model, "optimizer_def", None)
  if optimizer is None:
    raise TrainConfigError("no optimizer: set train.optimizer or the model's optimizer_def "
                           "in gin (e.g. OPTIMIZER = @optimizers.adamw())")
  optimizer = optimizers_lib.as_optimizer(optimizer)
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  os.makedirs(model_dir, exist_ok=True)
  layout = partitioner.get_data_layout(train_dataset_cfg.batch_size)
  converter_cls = utils.feature_converter_cls_for(model)

  train_ds = utils.get_dataset(train_dataset_cfg, layout.shard_id, layout.num_shards,
                               converter_cls, num_epochs=None)
  shapes, types = model_input_shapes(train_ds)
  # Parameter init uses the global batch shape, as T5X does.
  shapes = {k: (train_dataset_cfg.batch_size,) + v[1:] for k, v in shapes.items()}
  init_rng, dropout_seed = train_rngs(random_seed)
  init_fn, abstract_state, state_axes = create_train_state(
      model, optimizer, partitioner, shapes, types, init_rng)

  eval_ds = None
  if train_eval_dataset_cfg is not None:
    eval_layout = partitioner.get_data_layout(train_eval_dataset_cfg.batch_size)
    eval_ds = utils.get_dataset(train_eval_dataset_cfg, eval_layout.shard_id,
                                eval_layout.num_shards, converter_cls, num_epochs=1,
                                drop_remainder=False)
    if eval_steps:
      eval_ds = eval_ds.take(eval_steps)
  evaluator = None
  if infer_eval_dataset_cfg is not None and inference_evaluator_cls is not None:
    evaluator = inference_evaluator_cls(
        infer_eval_dataset_cfg=infer_eval_dataset_cfg, model=model, partitioner=partitioner,
        params_axes=state_axes.params, log_dir=os.path.join(model_dir, "inference_eval"))

  save_cfg = checkpoint_cfg.save or checkpoints.SaveCheckpointConfig(period=total_steps)
  manager = checkpoints.CheckpointManager(model_dir, save_cfg)
  trainer = None
  preemption = checkpoints.PreemptionHandler()
  progress = None
  try:
    state, position = _initial_state(
        manager, checkpoint_cfg.restore, init_fn, init_rng, abstract_state,
        fresh_params_fn=None if param_init_fn is None else (
            lambda params: param_init_fn(params, model)))
    step = int(jax.device_get(state.step))
    consumed = _batches_to_skip(position, train_dataset_cfg)
    # Exact resume: the pipeline is deterministic given its seed, so skipping
    # the consumed batches reproduces the iterator position.
    batches = utils.as_numpy_iterator(train_ds.skip(consumed) if consumed else train_ds)
    trainer = trainer_lib.Trainer(model, optimizer, partitioner, state_axes, trainer_config,
                                  summary_dir=os.path.join(model_dir, "train"),
                                  rng_seed=dropout_seed)
    if summarize_config_fn is not None:
      summarize_config_fn(model_dir, trainer.writer, step)

    def run_evals(at_step):
      if eval_ds is not None:
        values = trainer.evaluate(state.params, utils.as_numpy_iterator(eval_ds), at_step)
        logging.info("step %d teacher-forced eval: %s", at_step, values)
      if evaluator is not None:
        evaluator.evaluate(step=at_step, params=state.params)

    progress = trainer_lib.ProgressBar(total=total_steps, initial=step)
    if run_eval_before_training:
      run_evals(step)
    while step < total_steps and not preemption.requested():
      next_save = (step // save_cfg.period + 1) * save_cfg.period
      next_eval = (step // eval_period + 1) * eval_period
      chunk = min(next_save, next_eval, total_steps) - step
      state, _, ran = trainer.train(state, batches, chunk, preemption.requested, progress)
      step += ran
      consumed += ran
      if ran < chunk and not preemption.requested():
        break  # data exhausted
      if step % save_cfg.period == 0 or step >= total_steps or preemption.requested():
        manager.save(step, state, _data_position(train_dataset_cfg, consumed))
      if step % eval_period == 0 or step >= total_steps:
        run_evals(step)
    # Always leave a checkpoint of the final (or preempted) state.
    manager.save(step, state, _data_position(train_dataset_cfg, consumed))
  finally:
    if progress is not None:
      progress.close()
    preemption.close()
    manager.close()
    if trainer is not None:
      trainer.close()
  return step, state


def _initial_state(manager: checkpoints.CheckpointManager,
                   restore_cfg: Optional[checkpoints.RestoreCheckpointConfig],
                   init_fn, init_rng, abstract_state, fresh_params_fn=None):
  """(state, data position) from model_dir, the restore config, or scratch.

  `fresh_params_fn(params) -> params` runs only on a scratch start.
  """
  def scratch():
    state = init_fn(init_rng)
    if fresh_params_fn is not None:
      state = state.replace(params=fresh_params_fn(state.params))
    return state, None

  if manager.latest_step() is not None:
    return manager.restore(abstract_state)
  if restore_cfg is None or not restore_cfg.path:
    return scratch()
  try:
    state_dir = checkpoints.resolve_state_dir(restore_cfg.path, restore_cfg.mode,
                                              restore_cfg.step)
  except checkpoints.CheckpointError:
    if restore_cfg.fallback_to_scratch:
      logging.warning("no checkpoint at %s; training from scratch", restore_cfg.path)
      return scratch()
    raise
  if restore_cfg.params_only:
    state = init_fn(init_rng)
    params = checkpoints.restore_params(state_dir, abstract_state.params)
    return state.replace(params=params), None
  if os.path.basename(state_dir) != checkpoints.STATE_ITEM:
    raise checkpoints.CheckpointError(
        f"{state_dir} holds only parameters; set RestoreCheckpointConfig.params_only=True")
  step_dir = os.path.dirname(state_dir)
  source = checkpoints.CheckpointManager(os.path.dirname(step_dir))
  try:
    state, position = source.restore(abstract_state, int(step_dir.rsplit("_", 1)[-1]),
                                     restore_dataset=restore_cfg.restore_dataset)
  finally:
    source.close()
  return state, position


# -- dry run -------------------------------------------------------------------------------
def dry_run(*, batch_size: Optional[int] = None) -> Dict[str, Any]:
  """Checks a parsed gin config's mesh and batch without training (``DRY_RUN = True``).

  Builds the gin-configured `Partitioner` on the visible devices -- fake a
  pod's count on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=16``
  -- and checks that ``batch_size`` splits over its ``data`` axis. It neither
  calls `jax.distributed.initialize` (``distributed=None`` overrides the gin
  binding), builds the model, nor reads data.

  Returns:
    ``{"devices", "mesh": {"data", "model"}, "global_batch", "per_device_batch"}``.
  """
  import gin  # pylint: disable=g-import-not-at-top
  partitioner = gin.get_configurable(partitioning.Partitioner)(distributed=None)
  partitioner.get_data_layout(batch_size)  # raises if the batch does not split
  return {"devices": jax.device_count(), "mesh": dict(partitioner.mesh.shape),
          "global_batch": batch_size,
          "per_device_batch": batch_size // partitioner.num_data_shards if batch_size else None}


# -- command line --------------------------------------------------------------------
def is_user_error(e: BaseException) -> bool:
  """Errors raised by p5jax/tasks code on bad input: their message is the report.

  By project convention those are custom exception classes with a message
  naming the file/field; gin re-raises them as proxy subclasses, hence the MRO.
  """
  return any(getattr(cls, "__module__", "").split(".")[0] in ("p5jax", "tasks")
             for cls in type(e).__mro__)


def _quiet_library_info_logs(prefixes=("/orbax/",)) -> None:
  """Drops INFO lines from chatty libraries (orbax logs every file it writes)."""
  class _Filter(logging.Filter):
    def filter(self, record):
      return record.levelno >= logging.WARNING or not any(
          p in record.pathname for p in prefixes)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_Filter())


def main(argv: Optional[Sequence[str]] = None) -> None:
  """``python -m p5jax.train --gin_file=... --gin.MODEL_DIR="'...'"``."""
  import gin  # pylint: disable=g-import-not-at-top
  flag_values = gin_utils.define_gin_flags()

  def body():
    _quiet_library_info_logs()
    train_using_gin = gin.configurable(train)
    gin_utils.parse_gin_flags(flag_values.gin_search_paths, flag_values.gin_file,
                              flag_values.gin_bindings, finalize_config=False)
    # Task modules register gin configurables at import: import them before
    # the config is locked (T5X imports them from the gin files).
    utils.import_module(gin_utils.macro_value("TASK_MODULE"))
    gin.finalize()
    if gin_utils.macro_value("DRY_RUN", False):
      print(json.dumps(dry_run(batch_size=gin_utils.macro_value("BATCH_SIZE"))))
      return
    # The data root must be set before gin builds the model (its vocabulary
    # lives under the data root), i.e. before `train`'s arguments exist.
    data_dir = gin_utils.macro_value("DATA_DIR")
    if data_dir:
      schema.set_data_root(data_dir)
    train_using_gin(summarize_config_fn=gin_utils.summarize_gin_config)

  gin_utils.run_cli(body, is_user_error, argv)


if __name__ == "__main__":
  # Run the functions of the importable module (not this `__main__` copy) so
  # gin files configure `p5jax.train.train` in both notebooks and the CLI.
  from p5jax import train as _train_module  # pylint: disable=g-import-not-at-top,import-self
  _train_module.main()
