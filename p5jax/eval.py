r"""Evaluates a checkpoint on every per-prompt task of a mixture (T5X ``eval.py``).

  python -m p5jax.eval --gin_file=gin/runs/eval.gin \
    --gin.CHECKPOINT_PATH="'/tmp/p5_ml100k'" \
    --gin.MIXTURE_OR_TASK_NAME="'p5_ml100k_sequential_eval'"

The model comes from a model gin file (``--gin_file=gin/models/small.gin``) or,
when none defines ``MODEL``, from the ``config.gin`` that `p5jax.train`
wrote next to the checkpoints. Results (`evaluation.write_results`:
``results.md``, ``results.json``, ``results.png``) go to ``EVAL_OUTPUT_DIR``,
by default ``<run dir of CHECKPOINT_PATH>/eval``; the markdown table is also
printed. `evaluate` is importable and takes plain Python objects, so a
notebook or the training job can call it without gin.
"""
import ast
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import seqio

from p5jax import checkpoints
from p5jax import evaluation
from p5jax import gin_utils
from p5jax import partitioning
from p5jax import utils
from p5jax import vocab
from p5jax.data import schema

CONFIG_GIN = "config.gin"


def run_dir_of(path: str) -> str:
  """``<run>/checkpoint_<n>[/state]`` or ``<run>`` -> ``<run>``."""
  path = os.path.abspath(os.path.expanduser(path))
  parts = path.rstrip("/").split("/")
  for i in range(len(parts) - 1, 0, -1):
    if parts[i].startswith(checkpoints.STEP_PREFIX + "_"):
      return "/".join(parts[:i])
  return path


def _step_of(state_dir: str) -> Optional[int]:
  for part in reversed(state_dir.rstrip("/").split("/")):
    if part.startswith(checkpoints.STEP_PREFIX + "_") and part.rsplit("_", 1)[-1].isdigit():
      return int(part.rsplit("_", 1)[-1])
  return None


def load_params(model, restore_checkpoint_cfg: checkpoints.RestoreCheckpointConfig,
                partitioner: partitioning.Partitioner):
  """(params sharded by their logical axes, params mesh axes, step or None)."""
  if restore_checkpoint_cfg is None or not restore_checkpoint_cfg.path:
    raise checkpoints.CheckpointError(
        "no checkpoint to evaluate: set CHECKPOINT_PATH (RestoreCheckpointConfig.path)")
  cfg = restore_checkpoint_cfg
  abstract, axes = evaluation.init_params_axes(model, partitioner)
  state_dir = checkpoints.resolve_state_dir(cfg.path, cfg.mode, cfg.step)
  params = checkpoints.restore_params(state_dir, abstract)
  return params, axes, _step_of(state_dir)


def evaluate(*,
             model,
             dataset_cfg: utils.DatasetConfig,
             restore_checkpoint_cfg: Optional[checkpoints.RestoreCheckpointConfig] = None,
             partitioner: Optional[partitioning.Partitioner] = None,
             output_dir: Optional[str] = None,
             inference_evaluator_cls=seqio.Evaluator,
             data_dir: Optional[str] = None,
             eval_config: Optional[evaluation.EvalConfig] = None,
             params: Any = None,
             params_axes: Any = None,
             print_table: bool = True) -> List[Dict[str, Any]]:
  """Evaluates every per-prompt task of ``dataset_cfg.mixture_or_task_name``.

  Args:
    model: `models.EncoderDecoderModel`.
    dataset_cfg: mixture/task, split, optional feature lengths, module to
      import (``tasks.mixtures``); ``batch_size`` is the decoding batch unless
      `eval_config` sets one.
    restore_checkpoint_cfg: which checkpoint's parameters to evaluate (not
      needed when `params` is given).
    partitioner: mesh + rules (default: all devices data-parallel).
    output_dir: where results go; None = ``<run dir of the checkpoint>/eval``.
    inference_evaluator_cls: the SeqIO evaluator class (`seqio.Evaluator`).
    data_dir: prepared-data root (`schema.set_data_root`); None keeps the default.
    eval_config: decoding/scoring options (`evaluation.EvalConfig`).
    params, params_axes: evaluate these parameters instead of a checkpoint.
    print_table: print the markdown results table.

  Returns:
    The result rows (one per prompt), also written to ``output_dir``.
  """
  if data_dir:
    schema.set_data_root(data_dir)
  utils.import_module(dataset_cfg.module)
  utils.get_mixture_or_task(dataset_cfg.mixture_or_task_name)
  partitioner = partitioner or partitioning.Partitioner()
  step = None
  if params is None:
    params, params_axes, step = load_params(model, restore_checkpoint_cfg, partitioner)
  elif params_axes is None:
    _, params_axes = evaluation.init_params_axes(model, partitioner)
  if eval_config is None:
    eval_config = evaluation.EvalConfig(
        batch_size=dataset_cfg.batch_size,
        candidate_batch_size=max(partitioner.num_data_shards, 4))
  if output_dir is None:
    if restore_checkpoint_cfg is None or not restore_checkpoint_cfg.path:
      raise evaluation.EvaluationError("set output_dir (EVAL_OUTPUT_DIR) or a checkpoint path")
    output_dir = os.path.join(run_dir_of(restore_checkpoint_cfg.path), "eval")

  runner = evaluation.ModelRunner(model, params, params_axes, partitioner)
  evaluator = evaluation.PromptEvaluator(
      runner, eval_config, feature_converter_cls=utils.feature_converter_cls_for(model),
      evaluator_cls=inference_evaluator_cls)
  rows: List[Dict[str, Any]] = []
  extra = {"mixture_or_task_name": dataset_cfg.mixture_or_task_name, "split": dataset_cfg.split,
           "step": step, "checkpoint": getattr(restore_checkpoint_cfg, "path", None)}

  def on_result(result: evaluation.TaskResult):
    rows.append(result.row)
    # Rewritten after every prompt: a long evaluation leaves partial results.
    if jax.process_index() == 0:
      evaluation.write_results(rows, output_dir, extra)

  evaluator.evaluate(dataset_cfg.mixture_or_task_name, dataset_cfg.split,
                     dataset_cfg.task_feature_lengths, step=step, on_result=on_result)
  if print_table and jax.process_index() == 0:
    print(evaluation.results_markdown(rows))
    print(f"results written to {output_dir}/results.{{md,json,png}}")
  return rows


# -- command line --------------------------------------------------------------------
USER_ERRORS = (gin_utils.GinConfigError, utils.UnknownTaskError, utils.DatasetConfigError,
               checkpoints.CheckpointError, evaluation.EvaluationError,
               partitioning.PartitioningError, vocab.VocabularyNotFoundError)


def _binding_value(bindings: Sequence[str], macro: str) -> Optional[str]:
  for b in bindings:
    name, _, value = b.partition("=")
    if name.strip() == macro:
      try:
        return ast.literal_eval(value.strip())
      except (ValueError, SyntaxError):
        return None
  return None


def parse_flags_with_run_config(search_paths: Sequence[str], gin_files: Sequence[str],
                                bindings: Sequence[str]) -> None:
  """`gin_utils.parse_gin_flags`, falling back to the run's ``config.gin`` for MODEL.

  If no given gin file defines ``MODEL``, the ``config.gin`` written by
  `p5jax.train` in the run directory of ``CHECKPOINT_PATH`` is parsed first
  (the eval gin and the command line then override its macros).
  """
  import gin  # pylint: disable=g-import-not-at-top
  try:
    gin_utils.parse_gin_flags(search_paths, gin_files, bindings, finalize_config=False)
    _import_task_module_and_finalize()
    return
  except gin_utils.MissingMacroError as e:
    if "macro MODEL " not in str(e):
      raise
    path = _binding_value(bindings, "CHECKPOINT_PATH")
    config = os.path.join(run_dir_of(path), CONFIG_GIN) if path else None
    if not config or not os.path.exists(config):
      raise gin_utils.GinConfigError(
          f"{e}\nno model gin file given and no {CONFIG_GIN} next to CHECKPOINT_PATH "
          f"({config}); add e.g. --gin_file=gin/models/small.gin") from None
    logging.info("taking MODEL from %s", config)
  gin.clear_config()
  gin_utils.parse_gin_flags(search_paths, [config] + list(gin_files), bindings,
                            finalize_config=False)
  _import_task_module_and_finalize()


def _import_task_module_and_finalize() -> None:
  """Imports TASK_MODULE before gin locks its config (task modules are gin-configurable)."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    module = gin.query_parameter("%TASK_MODULE")
  except ValueError:
    module = None
  utils.import_module(module)
  gin.finalize()
  # Before gin builds MODEL: its vocabulary lives under the data root.
  data_dir = gin_utils.macro_value("DATA_DIR")
  if data_dir:
    schema.set_data_root(data_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """``python -m p5jax.eval --gin_file=gin/runs/eval.gin --gin.CHECKPOINT_PATH=...``."""
  import gin  # pylint: disable=g-import-not-at-top
  flag_values = gin_utils.define_gin_flags()

  def body():
    evaluate_using_gin = gin.configurable(evaluate)
    parse_flags_with_run_config(flag_values.gin_search_paths, flag_values.gin_file,
                                flag_values.gin_bindings)
    evaluate_using_gin()

  gin_utils.run_cli(body, lambda e: isinstance(e, USER_ERRORS), argv)


if __name__ == "__main__":
  # Run the importable module's functions so gin configures `p5jax.eval.evaluate`.
  from p5jax import eval as _eval_module  # pylint: disable=g-import-not-at-top,import-self
  _eval_module.main()
