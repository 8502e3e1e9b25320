"""All five families on review data, end to end (issue 7).

An Amazon-format fixture (reviews_Beauty_5.json.gz + meta_Beauty.json.gz, ~1k
reviews with text) is prepared by the main job's stage 1, a very small T5
trains a few steps on ``p5_amazon_beauty_pretrain`` (gin/experiments/
amazon_tiny.gin) and `p5jax.eval.evaluate` reports text metrics for
an explanation (3-1) and a review-summary (4-1) prompt and RMSE/MAE for a
review-rating prompt (4-2). The same checkpoint feeds `p5jax.embed` and the
heads (issue 8): one table of heads beside generative rating.
"""
import json
import math
import os

import gin
import pytest
import seqio

from p5jax import checkpoints
from p5jax import eval as eval_lib
from p5jax import evaluation
from p5jax import main as main_lib
from p5jax import utils
from p5jax.data import schema
from tests import fixtures

GIN_FILE = "gin/experiments/amazon_tiny.gin"
EVAL_MIXTURE = "p5_amazon_beauty_e2e_test"
# One prompt per metric kind: each prompt compiles its own decoding function.
EVAL_TASKS = ("p5_amazon_beauty_explanation_3_1", "p5_amazon_beauty_review_4_1",
              "p5_amazon_beauty_review_4_2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("amazon_e2e")
  world = fixtures.make_world()
  raw_dir = fixtures.write_amazon(tmp / "raw", world)
  model_dir = str(tmp / "model")
  stats = main_lib.setup([GIN_FILE], [f"MODEL_DIR = {model_dir!r}",
                                      f"DATA_DIR = {str(tmp / 'data')!r}",
                                      f"RAW_DIR = {raw_dir!r}",
                                      # train_test covers the teacher-forced eval.
                                      "train_script.train.train_eval_dataset_cfg = None"])
  args = main_lib.run_arguments()
  main_lib.train()
  yield dict(stats=stats, args=args, model_dir=model_dir, num_reviews=len(world.events))
  gin.clear_config()
  schema.set_data_root(None)
  seqio.MixtureRegistry.remove(EVAL_MIXTURE)


def _evaluate(run, mixture_or_task, out_dir, eval_config):
  """`p5jax.eval.evaluate` of the trained fixture model on the test split."""
  return eval_lib.evaluate(
      model=run["args"]["model"],
      dataset_cfg=utils.DatasetConfig(
          mixture_or_task_name=mixture_or_task, task_feature_lengths=None, split="test",
          batch_size=eval_config.batch_size, shuffle=False, seed=42,
          module="tasks.mixtures"),
      restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(path=run["model_dir"]),
      partitioner=run["args"]["partitioner"], output_dir=out_dir,
      eval_config=eval_config, print_table=False)


def test_fixture_is_review_data_with_text(run):
  assert run["num_reviews"] >= 500
  stats = run["stats"]
  assert stats["dataset"] == "amazon_beauty"
  assert stats["reviews_with_text"] > 0 and stats["reviews_with_explanation"] > 0
  assert sum(stats["reviews"].values()) >= 500


def test_pretrain_mixture_has_all_five_families(run):
  del run
  mixture = seqio.get_mixture_or_task("p5_amazon_beauty_pretrain")
  assert sorted(t.name for t in mixture.tasks) == [
      f"p5_amazon_beauty_{f}" for f in
      ("direct", "explanation", "rating", "review", "sequential")]


def test_training_wrote_a_checkpoint(run):
  assert os.path.isdir(os.path.join(run["model_dir"], "checkpoint_4"))
  assert os.path.exists(os.path.join(run["model_dir"], "config.gin"))


def test_evaluate_reports_text_and_rating_metrics(run):
  from tasks import mixtures  # pylint: disable=g-import-not-at-top
  seqio.MixtureRegistry.remove(EVAL_MIXTURE)
  seqio.MixtureRegistry.add(EVAL_MIXTURE, list(EVAL_TASKS), default_rate=1.0,
                            mixture_cls=mixtures.P5Mixture)
  out_dir = os.path.join(run["model_dir"], "eval_e2e")
  rows = _evaluate(run, EVAL_MIXTURE, out_dir, evaluation.EvalConfig(
      batch_size=2, text_beam_size=2, max_examples=2))

  by_prompt = {r["prompt"]: r for r in rows}
  assert sorted(by_prompt) == ["3-1", "4-1", "4-2"]
  assert all(r["examples"] == 2 and r["seen"] for r in rows)
  for prompt, text_metrics in (("3-1", ("bleu4", "rouge1", "rouge2", "rougeL")),
                               ("4-1", ("bleu2", "rouge1", "rouge2", "rougeL"))):
    row = by_prompt[prompt]
    assert row["family"] == ("explanation" if prompt[0] == "3" else "review")
    for m in text_metrics:
      assert isinstance(row[m], float) and 0.0 <= row[m] <= 100.0, (prompt, m, row)
    assert "rmse" not in row
  row = by_prompt["4-2"]
  assert row["family"] == "review"
  # An untrained model may answer no valid rating: such answers count as the
  # largest possible error (4 stars), so RMSE/MAE are always numbers.
  assert math.isfinite(row["rmse"]) and math.isfinite(row["mae"]), row
  assert 0.0 <= row["mae"] <= row["rmse"] <= 4.0, row
  assert "bleu2" not in row

  with open(os.path.join(out_dir, "results.json")) as f:
    assert len(json.load(f)["rows"]) == 3
  table = open(os.path.join(out_dir, "results.md")).read()
  header = table.splitlines()[0]
  for col in ("bleu4", "bleu2", "rougeL", "rmse", "mae"):
    assert f" {col} " in header
  assert "| p5_amazon_beauty_review_4_2 | 4-2 | review | seen | 2 |" in table


def test_heads_beside_generation_from_the_trained_checkpoint(run, tmp_path):
  """Issue 8 on a tiny trained checkpoint: embed -> heads -> one table with generation."""
  from p5jax import embed  # pylint: disable=g-import-not-at-top
  from p5jax import features  # pylint: disable=g-import-not-at-top
  from p5jax import heads  # pylint: disable=g-import-not-at-top
  args, task = run["args"], "p5_amazon_beauty_rating_1_1"
  gen_dir = str(tmp_path / "gen")
  _evaluate(run, task, gen_dir, evaluation.EvalConfig(batch_size=4, max_examples=8))
  config = features.EmbedConfig(task=task, splits=("train", "test"), batch_size=8,
                                inputs_length=128, targets_length=16, max_examples=64)
  # As `python -m p5jax.embed --model_dir=...` does: the model from the run's config.gin.
  model, data_dir = embed.load_model(run["model_dir"])
  assert data_dir and model.output_vocabulary == args["model"].output_vocabulary
  params, axes = embed.load_params(run["model_dir"], model, args["partitioner"], config)
  out = str(tmp_path / "rating.parquet")
  embed.run(model, params, axes, args["partitioner"], config, out, progress=False)

  rows = heads.compare(out, "rating", ["mean", "linear", "gbdt"],
                       [os.path.join(gen_dir, "results.json")])
  methods = [r["method"] for r in rows]
  assert methods == [f"generation {task}", "training mean", "linear on P5 features",
                     "gbdt on P5 features", "linear on ID baseline", "gbdt on ID baseline"]
  assert rows[0]["n_eval"] == 8
  for r in rows:
    assert 0.0 <= r["mae"] <= r["rmse"] <= 4.0, r
  assert all(r["n_eval"] == 64 for r in rows[1:])  # heads report on the test split
  table = heads.compare_table(rows)
  assert table.count("\n") == 1 + len(rows) and "| gbdt on P5 features | rating |" in table
