"""Tests for p5jax.train / gin_utils: gin runs, exact resume, preemption, clear errors.

Uses the toy model and the tiny integer-token SeqIO task from `trainer_test`;
`test_experiment_gin_run_on_fixture` runs the real `gin/experiments/
ml100k_tiny.gin` and the main job's `ml100k_cpu.gin` (item tokens,
co-occurrence init) on the ML-100K-format fixture.
"""
import glob
import os
import signal

import gin
import jax
import numpy as np
import pytest
import tensorflow as tf

from p5jax import checkpoints
from p5jax import gin_utils
from p5jax import optimizers
from p5jax import partitioning
from p5jax import train as train_lib
from p5jax import trainer as trainer_lib
from p5jax import utils
import trainer_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": trainer_test.ENC_LEN, "targets": trainer_test.DEC_LEN}


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _toy_cfg(split="train", batch_size=8, shuffle=True, name=None):
  return utils.DatasetConfig(
      mixture_or_task_name=name or trainer_test.register_toy_task(),
      task_feature_lengths=LENGTHS, split=split, batch_size=batch_size, shuffle=shuffle,
      seed=3)


def _train(model_dir, total_steps, d_model=8, period=100, **kwargs):
  kwargs.setdefault("partitioner", partitioning.Partitioner(num_partitions=2))
  return train_lib.train(
      model=trainer_test.ToyModel(d_model=d_model),
      optimizer=optimizers.adamw(optimizers.linear_warmup_linear_decay(1e-2, total_steps=6)),
      train_dataset_cfg=_toy_cfg(), model_dir=str(model_dir), total_steps=total_steps,
      checkpoint_cfg=checkpoints.CheckpointConfig(
          save=checkpoints.SaveCheckpointConfig(period=period)),
      trainer_config=trainer_lib.TrainerConfig(log_every_steps=1),
      eval_period=100, random_seed=7, **kwargs)


def read_scalars(model_dir, tag):
  """{step: value} of a scalar written by clu's TensorBoard writer."""
  out = {}
  for path in sorted(glob.glob(os.path.join(model_dir, "**", "events.out.tfevents.*"),
                               recursive=True)):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def test_resume_is_exact_including_data_position(tmp_path):
  """6 steps straight == 3 steps, fresh objects + restore, 3 more (bitwise)."""
  step_a, state_a = _train(tmp_path / "a", 6)
  step_b1, _ = _train(tmp_path / "b", 3)
  assert (step_a, step_b1) == (6, 3)
  assert os.path.isdir(tmp_path / "b" / "checkpoint_3" / "dataset")
  step_b, state_b = _train(tmp_path / "b", 6)
  assert step_b == 6
  losses_a = read_scalars(str(tmp_path / "a"), "train/loss")
  losses_b = read_scalars(str(tmp_path / "b"), "train/loss")
  assert sorted(losses_a) == list(range(1, 7))
  assert losses_b == losses_a  # exact, incl. the batches after the restart
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state_a.state_dict()),
                         jax.device_get(state_b.state_dict()))


def test_sigterm_saves_and_stops(tmp_path):
  def preempt(model_dir, writer, step):  # runs after the handler is installed
    del model_dir, writer, step
    os.kill(os.getpid(), signal.SIGTERM)

  step, _ = _train(tmp_path, 6, summarize_config_fn=preempt)
  assert step == 0
  assert checkpoints.CheckpointManager(str(tmp_path)).all_steps() == [0]


def test_checkpoint_from_other_config_is_one_clear_error(tmp_path):
  _train(tmp_path, 1)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"params/embedding: checkpoint shape \(32, 8\), model shape \(32, 16\)"):
    _train(tmp_path, 2, d_model=16)


def test_unregistered_task_is_one_clear_error(tmp_path):
  trainer_test.register_toy_task()
  cfg = _toy_cfg(name="p5jax_toy_cpoy")
  with pytest.raises(utils.UnknownTaskError, match="'p5jax_toy_cpoy' is not registered.*"
                     "Did you mean: p5jax_toy_copy"):
    train_lib.train(model=trainer_test.ToyModel(), optimizer=optimizers.sgd(0.1),
                    train_dataset_cfg=cfg, model_dir=str(tmp_path), total_steps=1)


# -- gin ----------------------------------------------------------------------------------
TOY_GIN = f"""
from __gin__ import dynamic_registration
import trainer_test
include 'gin/runs/pretrain.gin'
MODEL = @trainer_test.ToyModel()
MIXTURE_OR_TASK_NAME = '{trainer_test.TOY_TASK}'
TASK_FEATURE_LENGTHS = {LENGTHS}
TRAIN_STEPS = 3
BATCH_SIZE = 8
EVAL_PERIOD = 3
SAVING_PERIOD = 2
LOG_EVERY_STEPS = 1
TASK_MODULE = None
"""


def _write_gin(tmp_path, text=TOY_GIN):
  path = tmp_path / "toy.gin"
  path.write_text(text)
  return str(path)


def test_gin_pretrain_run_writes_checkpoints_and_events(tmp_path):
  trainer_test.register_toy_task()
  train_using_gin = gin.configurable(train_lib.train)
  model_dir = tmp_path / "model"
  gin_utils.parse_gin_flags([REPO], [_write_gin(tmp_path)], [f"MODEL_DIR = '{model_dir}'"])
  step, _ = train_using_gin(summarize_config_fn=gin_utils.summarize_gin_config)
  assert step == 3
  assert sorted(os.listdir(model_dir / "train")) and (model_dir / "config.gin").exists()
  assert checkpoints.CheckpointManager(str(model_dir)).all_steps() == [2, 3]
  assert sorted(read_scalars(str(model_dir), "train/loss")) == [1, 2, 3]
  evals = read_scalars(str(model_dir), "train_eval/accuracy")
  assert list(evals) == [3] and 0.0 <= evals[3] <= 1.0


@pytest.mark.parametrize("run", ["pretrain", "finetune"])
def test_gin_run_files_parse_and_require_their_macros(run, tmp_path):
  text = TOY_GIN.replace("gin/runs/pretrain.gin", f"gin/runs/{run}.gin")
  with pytest.raises(gin_utils.MissingMacroError) as e:
    gin_utils.parse_gin_flags([REPO], [_write_gin(tmp_path, text)], ["MODLE_DIR = '/tmp/x'"])
  msg = str(e.value)
  assert "gin macro MODEL_DIR is required but not set; pass --gin.MODEL_DIR=" in msg
  assert "you set MODLE_DIR, which nothing uses -- a typo?" in msg
  assert ("INITIAL_CHECKPOINT_PATH" in msg) == (run == "finetune")
  gin.clear_config()
  bindings = ["MODEL_DIR = '/tmp/x'", "INITIAL_CHECKPOINT_PATH = '/tmp/y'"]
  gin_utils.parse_gin_flags([REPO], [_write_gin(tmp_path, text)], bindings)
  assert gin.query_parameter("%TRAIN_STEPS") == 3


@pytest.mark.parametrize("run,module", [("eval", "p5jax.eval"), ("infer", "p5jax.infer")])
def test_eval_and_infer_run_files_parse(run, module, tmp_path):
  pytest.importorskip(module)
  text = TOY_GIN.replace("gin/runs/pretrain.gin", f"gin/runs/{run}.gin")
  for macro in ("TRAIN_STEPS", "EVAL_PERIOD", "SAVING_PERIOD", "LOG_EVERY_STEPS"):
    text = "\n".join(l for l in text.splitlines() if not l.startswith(macro))
  out = "EVAL_OUTPUT_DIR" if run == "eval" else "INFER_OUTPUT_DIR"
  gin_utils.parse_gin_flags([REPO], [_write_gin(tmp_path, text)],
                            ["CHECKPOINT_PATH = '/tmp/c'", f"{out} = '/tmp/o'"])


def test_gin_errors_are_gin_config_errors(tmp_path):
  with pytest.raises(gin_utils.GinConfigError, match="not found"):
    gin_utils.parse_gin_flags([REPO], ["gin/runs/nope.gin"], [])
  with pytest.raises(gin_utils.GinConfigError, match="totl_steps"):
    gin_utils.parse_gin_flags([REPO], [_write_gin(tmp_path)],
                              ["MODEL_DIR = '/x'", "train_script.train.totl_steps = 3"])
  assert gin_utils.rewrite_gin_args(["prog", "--gin.MODEL_DIR='/m'", "--gin_file=a.gin"]) == [
      "prog", "--gin_bindings=MODEL_DIR = '/m'", "--gin_file=a.gin"]


# The README main job's config (item tokens + co-occurrence init) at toy
# dims, and the tiny experiment as written.
GIN_RUNS = {
    "ml100k_tiny": dict(item_tokens=False, bindings=[]),
    "ml100k_cpu": dict(item_tokens=True, bindings=[
        "network.T5Config.d_model = 32", "network.T5Config.head_dim = 8",
        "network.T5Config.d_ff = 64"]),
}


@pytest.mark.parametrize("name", sorted(GIN_RUNS))
def test_experiment_gin_run_on_fixture(tmp_path, name):
  """`gin/experiments/<name>.gin` for 3 steps on the ML-100K-format fixture."""
  fixtures = pytest.importorskip("fixtures")
  pytest.importorskip("tasks.mixtures")
  from p5jax import vocab  # pylint: disable=g-import-not-at-top
  from p5jax.data import schema  # pylint: disable=g-import-not-at-top
  run = GIN_RUNS[name]
  root = fixtures.prepared_root(tmp_path, dataset="ml-100k", item_tokens=run["item_tokens"])
  if not os.path.exists(os.path.join(root, "ml100k", vocab.SPIECE_FILENAME)):
    vocab.build_dataset_vocabulary(os.path.join(root, "ml100k"))
  import tasks.mixtures  # pylint: disable=g-import-not-at-top,unused-import
  train_using_gin = gin.configurable(train_lib.train)
  model_dir = tmp_path / "model"
  bindings = [f"MODEL_DIR = '{model_dir}'", f"DATA_DIR = '{root}'", "TRAIN_STEPS = 3",
              "SAVING_PERIOD = 2", "BATCH_SIZE = 4", "LOG_EVERY_STEPS = 1",
              "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 8}", *run["bindings"]]
  gin_utils.parse_gin_flags([REPO], [f"gin/experiments/{name}.gin"], bindings)
  schema.set_data_root(gin_utils.macro_value("DATA_DIR"))
  try:
    step, _ = train_using_gin(train_eval_dataset_cfg=None)  # teacher-forced eval: tested above
  finally:
    schema.set_data_root(None)
  assert step == 3
  assert checkpoints.CheckpointManager(str(model_dir)).all_steps() == [2, 3]
  losses = read_scalars(str(model_dir), "train/loss")
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
