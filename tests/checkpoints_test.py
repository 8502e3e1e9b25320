"""Tests for p5jax.checkpoints: sharded save/restore, params-only restore, errors."""
import os
import signal

import jax
import numpy as np
import pytest

from p5jax import checkpoints
from p5jax import optimizers
from p5jax import partitioning
from p5jax import train as train_lib
import trainer_test  # the toy model (tests/ is on sys.path under pytest)


def _state(partitioner, d_model=8, seed=0):
  batch = trainer_test.make_batches(1)[0]
  model = trainer_test.ToyModel(d_model=d_model)
  shapes = {k: v.shape for k, v in batch.items()}
  init_fn, abstract, _ = train_lib.create_train_state(
      model, optimizers.adamw(1e-3), partitioner, shapes)
  return init_fn(jax.random.key(seed)), abstract


def _assert_trees_equal(a, b):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                         a, b)


@pytest.fixture(scope="module")
def mesh():
  return partitioning.Partitioner(num_partitions=2)


def test_roundtrip_keeps_values_shardings_and_data_position(tmp_path, mesh):
  state, abstract = _state(mesh)
  mngr = checkpoints.CheckpointManager(str(tmp_path), checkpoints.SaveCheckpointConfig(keep=2))
  for step in (1, 2, 3):
    assert mngr.save(step, state, {"batches_consumed": step})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [2, 3]  # keep=2
  assert sorted(os.listdir(tmp_path)) == ["checkpoint_2", "checkpoint_3"]
  restored, position = mngr.restore(abstract)
  assert position == {"batches_consumed": 3}
  _assert_trees_equal(restored, state)
  kernel = restored.params["logits"]["kernel"]
  assert kernel.sharding == state.params["logits"]["kernel"].sharding
  assert kernel.sharding.spec == partitioning.PartitionSpec(None, "model")
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint for step 1 .*available: \\[2, 3\\]"):
    mngr.restore(abstract, step=1)
  mngr.close()


def test_mismatched_model_config_names_the_parameter(tmp_path, mesh):
  state, _ = _state(mesh, d_model=8)
  mngr = checkpoints.CheckpointManager(str(tmp_path))
  mngr.save(1, state, {"batches_consumed": 1})
  mngr.wait_until_finished()
  _, other_abstract = _state(mesh, d_model=16)
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    mngr.restore(other_abstract)
  msg = str(e.value)
  assert "parameter params/embedding: checkpoint shape (32, 8), model shape (32, 16)" in msg
  assert "checkpoint_1" in msg
  # Params-only restore (fine-tuning) checks the same way.
  with pytest.raises(checkpoints.CheckpointMismatchError, match="wi/kernel"):
    checkpoints.restore_params(str(tmp_path), other_abstract.params)
  mngr.close()


def test_params_only_restore_from_run_dir_and_bare_params(tmp_path, mesh):
  state, abstract = _state(mesh, seed=1)
  mngr = checkpoints.CheckpointManager(str(tmp_path / "run"))
  mngr.save(5, state, {"batches_consumed": 5})
  mngr.close()
  for path in (tmp_path / "run", tmp_path / "run" / "checkpoint_5"):
    params = checkpoints.restore_params(str(path), abstract.params)
    _assert_trees_equal(params, state.params)
    assert params["wi"]["kernel"].sharding.spec == partitioning.PartitionSpec(None, "model")
  # A bare params tree as `p5jax.convert` writes it (plain numpy arrays).
  checkpoints.save_params(str(tmp_path / "converted"), jax.device_get(state.params))
  params = checkpoints.restore_params(str(tmp_path / "converted"), abstract.params)
  _assert_trees_equal(params, state.params)
  with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
    checkpoints.restore_params(str(tmp_path / "nope"), abstract.params)
  with pytest.raises(checkpoints.CheckpointError, match="no step 7"):
    checkpoints.resolve_state_dir(str(tmp_path / "run"), mode="specific", step=7)


def test_sigterm_sets_the_preemption_flag():
  before = signal.getsignal(signal.SIGTERM)
  handler = checkpoints.PreemptionHandler()
  try:
    assert not handler.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.requested()
  finally:
    handler.close()
  assert signal.getsignal(signal.SIGTERM) is before  # previous handler restored
