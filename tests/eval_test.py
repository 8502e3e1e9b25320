"""Tests for p5jax.eval: a checkpoint evaluated on a mixture writes the results table."""
import json
import os

import pytest

from p5jax import checkpoints
from p5jax import eval as eval_lib
from p5jax import evaluation
from p5jax import partitioning
from p5jax import utils
from p5jax.data import schema
from tests import evaluation_test


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = evaluation_test.prepared_root(tmp_path_factory)
  schema.set_data_root(root)
  model = evaluation_test.tiny_model()
  partitioner = partitioning.Partitioner(num_partitions=2)
  params, _ = evaluation.random_params(model, partitioner)
  run = tmp_path_factory.mktemp("run")
  manager = checkpoints.CheckpointManager(str(run))
  manager.save(3, {"step": 3, "params": params})
  manager.close()
  yield dict(root=root, model=model, partitioner=partitioner, run=str(run))
  schema.set_data_root(None)


def test_evaluate_unseen_mixture_from_checkpoint(setup, capsys):
  cfg = utils.DatasetConfig(mixture_or_task_name="p5_ml100k_unseen",
                            task_feature_lengths=None, split="test", batch_size=8,
                            shuffle=False, seed=42, module="tasks.mixtures")
  rows = eval_lib.evaluate(
      model=setup["model"], dataset_cfg=cfg, partitioner=setup["partitioner"],
      restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(path=setup["run"]),
      eval_config=evaluation.EvalConfig(batch_size=8, max_examples=4))
  by_prompt = {r["prompt"]: r for r in rows}
  assert sorted(by_prompt) == ["1-10", "2-13", "5-8"]
  assert not any(r["seen"] for r in rows)
  assert {"rmse", "mae", "invalid"} <= set(by_prompt["1-10"])
  assert {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"} <= set(by_prompt["2-13"])
  assert {"hr@1", "ndcg@10"} <= set(by_prompt["5-8"])
  out_dir = os.path.join(setup["run"], "eval")  # default: <run dir>/eval
  payload = json.load(open(os.path.join(out_dir, "results.json")))
  assert payload["step"] == 3 and len(payload["rows"]) == 3
  assert os.path.exists(os.path.join(out_dir, "results.png"))
  printed = capsys.readouterr().out
  assert "| p5_ml100k_sequential_2_13 | 2-13 | sequential | unseen | 4 |" in printed


def test_run_dir_of():
  assert eval_lib.run_dir_of("/r/checkpoint_12/state") == "/r"
  assert eval_lib.run_dir_of("/r/checkpoint_12") == "/r"
  assert eval_lib.run_dir_of("/r") == "/r"
