r"""Writes a checkpoint's predictions for a task or mixture as JSONL (T5X ``infer.py``).

  python -m p5jax.infer --gin_file=gin/runs/infer.gin \
    --gin.MIXTURE_OR_TASK_NAME="'p5_ml100k_sequential_2_13'" \
    --gin.CHECKPOINT_PATH="'/tmp/p5_ml100k'" --gin.INFER_OUTPUT_DIR="'/tmp/p5_infer'"

One file per task, ``<output_dir>/<task>-<split>.jsonl``, one line per
example: ``{"index", "inputs", "targets", "prediction", "scores"}`` where
``prediction`` is the ranked item list (best first) for item prompts, the
answer / rating / sentence otherwise, and ``scores`` its log-likelihood(s).
Mode ``score`` instead writes ``{"index", "inputs", "targets", "score"}``,
the targets' log-likelihood (`model.score_batch`). Predictions are computed
exactly as `evaluation.PromptEvaluator` computes them for metrics.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import seqio

from p5jax import checkpoints
from p5jax import eval as eval_lib
from p5jax import evaluation
from p5jax import fileio
from p5jax import gin_utils
from p5jax import partitioning
from p5jax import utils
from p5jax.data import schema

MODES = ("predict", "predict_with_aux", "score")


def _write_jsonl(path: str, rows: Sequence[Dict[str, Any]]) -> None:
  data = "".join(json.dumps(r, default=evaluation._json_default) + "\n" for r in rows)  # pylint: disable=protected-access
  fileio.atomic_write(path, data.encode())


def infer(*,
          mode: str = "predict_with_aux",
          model,
          dataset_cfg: utils.DatasetConfig,
          restore_checkpoint_cfg: Optional[checkpoints.RestoreCheckpointConfig] = None,
          partitioner: Optional[partitioning.Partitioner] = None,
          output_dir: str,
          data_dir: Optional[str] = None,
          eval_config: Optional[evaluation.EvalConfig] = None,
          params: Any = None,
          params_axes: Any = None) -> List[str]:
  """Writes predictions (or scores) of every task in the mixture; returns the paths."""
  if mode not in MODES:
    raise evaluation.EvaluationError(f"infer mode {mode!r} is not one of {MODES}")
  if data_dir:
    schema.set_data_root(data_dir)
  utils.import_module(dataset_cfg.module)
  utils.get_mixture_or_task(dataset_cfg.mixture_or_task_name)
  partitioner = partitioner or partitioning.Partitioner()
  if params is None:
    params, params_axes, _ = eval_lib.load_params(model, restore_checkpoint_cfg, partitioner)
  elif params_axes is None:
    _, params_axes = evaluation.init_params_axes(model, partitioner)
  eval_config = eval_config or evaluation.EvalConfig(batch_size=dataset_cfg.batch_size)
  runner = evaluation.ModelRunner(model, params, params_axes, partitioner)
  paths = []
  for name in evaluation.eval_task_names(dataset_cfg.mixture_or_task_name, dataset_cfg.split):
    path = os.path.join(output_dir, f"{name}-{dataset_cfg.split}.jsonl")
    if mode == "score":
      rows = _score_rows(runner, model, name, dataset_cfg, eval_config)
    else:
      result = evaluation.PromptEvaluator(runner, eval_config).evaluate_task(
          name, dataset_cfg.split, dataset_cfg.task_feature_lengths)
      rows = [{"index": i, "inputs": inp, "targets": tgt, "prediction": pred,
               **({"scores": sc} if mode == "predict_with_aux" else {})}
              for i, (inp, tgt, pred, sc) in enumerate(zip(
                  result.inputs, result.targets, result.predictions,
                  result.scores or [None] * len(result.inputs)))]
    _write_jsonl(path, rows)
    paths.append(path)
  return paths


def _score_rows(runner, model, task_name, dataset_cfg, eval_config):
  """Targets' log-likelihood per example through `model.score_batch`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  converter = utils.feature_converter_cls_for(model)(pack=False)
  evaluator = seqio.Evaluator(
      mixture_or_task_name=task_name, feature_converter=converter,
      eval_split=dataset_cfg.split, sequence_length=dataset_cfg.task_feature_lengths,
      num_examples=eval_config.max_examples, async_compute_metrics=False)
  examples = list(tfds.as_numpy(evaluator.cached_task_datasets[task_name]))
  batch_size = -(-eval_config.batch_size // runner.partitioner.num_data_shards) * \
      runner.partitioner.num_data_shards
  rows = []
  for indices, batch, n in evaluation._batches(  # pylint: disable=protected-access
      evaluator.cached_model_datasets[task_name], batch_size):
    scores = runner.score_batch(batch)
    for i, s in zip(indices[:n], scores[:n]):
      ex = examples[int(i)]
      rows.append({"index": int(i),
                   "inputs": evaluation._text(ex.get("inputs_pretokenized", b"")),  # pylint: disable=protected-access
                   "targets": evaluation._text(ex.get("targets_pretokenized", b"")),  # pylint: disable=protected-access
                   "score": float(s)})
  return sorted(rows, key=lambda r: r["index"])


def main(argv: Optional[Sequence[str]] = None) -> None:
  """``python -m p5jax.infer --gin_file=gin/runs/infer.gin --gin.CHECKPOINT_PATH=...``."""
  import gin  # pylint: disable=g-import-not-at-top
  flag_values = gin_utils.define_gin_flags()

  def body():
    infer_using_gin = gin.configurable(infer)
    eval_lib.parse_flags_with_run_config(flag_values.gin_search_paths, flag_values.gin_file,
                                         flag_values.gin_bindings)
    for path in infer_using_gin():
      print(path)

  gin_utils.run_cli(body, lambda e: isinstance(e, eval_lib.USER_ERRORS), argv)


if __name__ == "__main__":
  from p5jax import infer as _infer_module  # pylint: disable=g-import-not-at-top,import-self
  _infer_module.main()
