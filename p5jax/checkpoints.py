"""Orbax checkpoints of the train state plus the data-iterator position.

Layout (T5X-like names; orbax `CheckpointManager` with ``step_prefix``)::

  <model_dir>/checkpoint_<step>/state/     TrainState (step, params, opt_state),
                                           sharded arrays (OCDBT)
  <model_dir>/checkpoint_<step>/dataset/   JSON: {"batches_consumed": n, ...}

The input pipeline is deterministic given its seed (seqio shuffles with a fixed
seed), so the data position is the number of batches consumed; on restore the
training dataset skips that many batches. This is exact and costs only the
preprocessing of the skipped batches -- much cheaper to store than tf.data's
own iterator checkpoint, which serializes shuffle buffers.

Restore modes (`RestoreCheckpointConfig`):

* resuming: the latest checkpoint in ``model_dir`` always wins (preemption safe);
* ``mode="latest"`` / ``"specific"`` with ``path``: the latest or a given step
  of another run (e.g. a pretraining run for fine-tuning);
* ``params_only=True`` (default): take only the parameters (fresh optimizer,
  step 0). Also reads a bare orbax checkpoint of a params tree (as written by
  `p5jax.convert`) or of ``{"params": ...}``.

A checkpoint whose parameters do not match the model raises
`CheckpointMismatchError` naming the first mismatched parameter and shapes.
"""
import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp

STATE_ITEM = "state"
DATASET_ITEM = "dataset"
STEP_PREFIX = "checkpoint"


class CheckpointError(Exception):
  """A checkpoint that is missing, unreadable or unusable."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint whose tree/shapes differ from the model being trained."""


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  """When and how to save (T5X `utils.SaveCheckpointConfig`).

  Attributes:
    period: save every `period` steps (and always at the end / on SIGTERM).
    keep: keep the newest `keep` checkpoints (None = all).
    save_dataset: store the data-iterator position.
    use_async: write in a background thread; arrays are copied to host
      before `save` returns, so the donated train state may be reused.
  """
  period: int = 1000
  keep: Optional[int] = None
  save_dataset: bool = True
  use_async: bool = True


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """Where to start from when ``model_dir`` has no checkpoint yet.

  Attributes:
    path: a checkpoint root (``<model_dir>``), one step directory
      (``<model_dir>/checkpoint_<step>``) or a bare orbax params checkpoint.
    mode: ``"latest"`` or ``"specific"`` (T5X modes).
    step: for ``mode="specific"`` with a root `path`.
    params_only: restore only parameters (fine-tuning), else the full state.
    restore_dataset: also restore the data position (full-state restores).
    fallback_to_scratch: start from scratch if `path` holds no checkpoint.
  """
  path: Optional[str] = None
  mode: str = "latest"
  step: Optional[int] = None
  params_only: bool = True
  restore_dataset: bool = False
  fallback_to_scratch: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  save: Optional[SaveCheckpointConfig] = SaveCheckpointConfig()
  restore: Optional[RestoreCheckpointConfig] = None


# -- tree comparison -------------------------------------------------------------
def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat_shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  """``{"params/encoder/.../kernel": shape}`` for arrays or array metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in leaves}


def check_compatible(expected: Dict[str, tuple], found: Dict[str, tuple], where: str) -> None:
  """Raises `CheckpointMismatchError` naming the first difference."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  shape_diffs = [(k, found[k], expected[k]) for k in sorted(set(expected) & set(found))
                 if tuple(found[k]) != tuple(expected[k])]
  if not (missing or unexpected or shape_diffs):
    return
  lines = [f"checkpoint at {where} does not match the model being trained "
           "(was it saved with a different model config?)"]
  for k, got, want in shape_diffs[:5]:
    lines.append(f"  parameter {k}: checkpoint shape {tuple(got)}, model shape {tuple(want)}")
  for k in missing[:5]:
    lines.append(f"  missing in checkpoint: {k} {tuple(expected[k])}")
  for k in unexpected[:5]:
    lines.append(f"  not in model: {k} {tuple(found[k])}")
  total = len(missing) + len(unexpected) + len(shape_diffs)
  if total > 5:
    lines.append(f"  ({total} differences in all)")
  raise CheckpointMismatchError("\n".join(lines))


def _metadata_tree(md: Any) -> Any:
  """Unwraps orbax metadata objects to the plain tree of array metadata."""
  for attr in ("item_metadata", "tree"):
    while hasattr(md, attr) and getattr(md, attr) is not None and not isinstance(md, dict):
      md = getattr(md, attr)
  return md


def _subtree(tree: Any, prefix: str) -> Dict[str, tuple]:
  flat = flat_shapes(tree)
  return {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + "/")}


# -- manager -----------------------------------------------------------------------
class CheckpointManager:
  """Saves/restores (TrainState, data position) under ``<model_dir>``."""

  def __init__(self, directory: str, save_cfg: Optional[SaveCheckpointConfig] = None):
    self.directory = os.path.abspath(directory)
    self.save_cfg = save_cfg or SaveCheckpointConfig()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.save_cfg.keep,
        step_prefix=STEP_PREFIX,
        enable_async_checkpointing=self.save_cfg.use_async,
        create=True)
    # Handlers are registered up front so a fresh manager (a restarted job)
    # can read item metadata before its first save/restore.
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATASET_ITEM: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> List[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_position: Optional[dict] = None,
           force: bool = True) -> bool:
    """Saves `state` (any pytree of arrays) and the JSON `data_position`."""
    if step in self._mngr.all_steps():
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if self.save_cfg.save_dataset and data_position is not None:
      items[DATASET_ITEM] = ocp.args.JsonSave(dict(data_position))
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("saving checkpoint %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, step: Optional[int] = None,
              restore_dataset: bool = True) -> Tuple[Any, Optional[dict]]:
    """Restores the state at `step` (default latest) onto `abstract_state`'s shardings.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set.
      step: step to restore; None = latest.
      restore_dataset: also return the saved data position.

    Returns:
      (state, data_position or None).
    """
    step = self._resolve_step(step)
    md = _metadata_tree(self._mngr.item_metadata(step)[STATE_ITEM])
    if md is None:
      raise CheckpointError(f"cannot read the train state metadata of {self._step_dir(step)}")
    check_compatible(flat_shapes(abstract_state), flat_shapes(md), self._step_dir(step))
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    has_dataset = os.path.isdir(os.path.join(self._step_dir(step), DATASET_ITEM))
    if restore_dataset and has_dataset:
      items[DATASET_ITEM] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    data = out[DATASET_ITEM] if (restore_dataset and has_dataset) else None
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return out[STATE_ITEM], data

  def _resolve_step(self, step: Optional[int]) -> int:
    steps = self._mngr.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory}; available: {sorted(steps)}")
    return step

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, f"{STEP_PREFIX}_{step}")

  def wait_until_finished(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


# -- params-only restore (fine-tuning / converted weights) -------------------------
def _is_pytree_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "_METADATA")) or os.path.exists(
      os.path.join(path, "manifest.ocdbt"))


def resolve_state_dir(path: str, mode: str = "latest", step: Optional[int] = None) -> str:
  """Finds the orbax pytree directory that `path` designates.

  `path` may be a run root (``checkpoint_<step>`` children), one step
  directory (with a ``state`` item) or a bare pytree checkpoint.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if _is_pytree_dir(path):
    return path
  for item in (STATE_ITEM, "params", "default"):
    if _is_pytree_dir(os.path.join(path, item)):
      return os.path.join(path, item)
  steps = {}
  for name in os.listdir(path):
    num = name[len(STEP_PREFIX) + 1:] if name.startswith(STEP_PREFIX + "_") else name
    if num.isdigit() and os.path.isdir(os.path.join(path, name)):
      steps[int(num)] = os.path.join(path, name)
  if not steps:
    raise CheckpointError(f"no orbax checkpoint found under {path}")
  if mode == "specific":
    if step is None:
      raise CheckpointError(f"mode='specific' needs a step directory or `step` (path {path})")
    if step not in steps:
      raise CheckpointError(f"no step {step} under {path}; available: {sorted(steps)}")
    chosen = steps[step]
  elif mode == "latest":
    chosen = steps[max(steps)]
  else:
    raise CheckpointError(f"unknown restore mode {mode!r}; use 'latest' or 'specific'")
  return resolve_state_dir(chosen)


def restore_params(path: str, abstract_params: Any, mode: str = "latest",
                   step: Optional[int] = None) -> Any:
  """Restores only the parameters from a checkpoint onto `abstract_params`.

  Args:
    path: see `resolve_state_dir`.
    abstract_params: tree of `jax.ShapeDtypeStruct` (with shardings).
    mode, step: as in `RestoreCheckpointConfig`.

  Returns:
    The parameters, sharded like `abstract_params`.
  """
  state_dir = resolve_state_dir(path, mode, step)
  ckptr = ocp.PyTreeCheckpointer()
  saved = _metadata_tree(ckptr.metadata(state_dir))
  has_params_key = isinstance(saved, dict) and "params" in saved
  found = _subtree(saved, "params") if has_params_key else flat_shapes(saved)
  check_compatible(flat_shapes(abstract_params), found, state_dir)
  target = {"params": abstract_params} if has_params_key else abstract_params
  restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=has_params_key))
  logging.info("restored parameters from %s", state_dir)
  return restored["params"] if has_params_key else restored


def save_params(path: str, params: Any) -> None:
  """Writes a bare orbax checkpoint of a params tree (the `p5jax.convert` format)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), params)
  ckptr.wait_until_finished()


# -- preemption ----------------------------------------------------------------------
class PreemptionHandler:
  """Turns SIGTERM into a flag that the training loop polls between steps.

  The loop then writes a final checkpoint and exits cleanly (preemptible TPU
  VMs send SIGTERM shortly before shutting down). Installs only on the main
  thread; restores the previous handler on `close`.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self._event.set()

  def requested(self) -> bool:
    return self._event.is_set()

  def close(self):
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    self._previous = {}
