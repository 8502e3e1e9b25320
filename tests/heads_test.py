"""Tests for p5jax.heads and the fit_head CLI on planted feature files."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p5jax import features
from p5jax import heads

DIM = 8
SPLITS = {"train": 600, "validation": 100, "test": 200}


def write_planted(path, kind="rating", dim=DIM, splits=None, noise=0.1, seed=0,
                  nan_row=None, drop_labels=False, users=20, items=30):
  """Rows with x ~ N(0, I); rating = 3 + 0.5 x.w + noise, label = [x.w > 0].

  Users/items are drawn at random; `kind="ids"` plants the rating in per-user
  and per-item biases instead (x is then pure noise).
  """
  rng = np.random.default_rng(seed)
  w = rng.normal(size=dim)
  user_bias = rng.normal(scale=0.8, size=users)
  item_bias = rng.normal(scale=0.8, size=items)
  schema = features.FeatureSchema(vector_columns={"pooled_mean": dim, "user_span": dim})
  with features.FeatureWriter(path, schema) as writer:
    start = 0
    for split, n in (splits or SPLITS).items():
      x = rng.normal(size=(n, dim)).astype(np.float32)
      u = rng.integers(users, size=n)
      i = rng.integers(items, size=n)
      if kind == "ids":
        rating = 3 + user_bias[u] + item_bias[i] + rng.normal(scale=noise, size=n)
      else:
        rating = 3 + 0.5 * x @ w + rng.normal(scale=noise, size=n)
      label = (x @ w > 0).astype(int)
      if nan_row is not None and split == "train":
        x[nan_row, 0] = np.nan
      writer.write({
          "example_index": np.arange(start, start + n), "split": [split] * n,
          "user_id": [str(v) for v in u], "item_id": [str(v) for v in i],
          "rating": rating.astype(np.float32),
          "label": [None] * n if drop_labels else label.tolist(),
          "target": [f"{r:.1f}" for r in rating],
          "has_user_span": np.ones(n, bool), "has_item_span": np.ones(n, bool),
          "pooled_mean": x, "user_span": x[:, ::-1].copy()})
      start += n
  return path


@pytest.fixture(scope="module")
def rating_file(tmp_path_factory):
  return write_planted(str(tmp_path_factory.mktemp("f") / "rating.parquet"))


def test_linear_head_reaches_noise_level(rating_file):
  head = heads.fit_head(rating_file, heads.HeadConfig(head="linear", target="rating"))
  assert head.metrics["rmse"] < 0.13  # planted noise sd is 0.1
  assert head.metrics["n_train"] == 600 and head.metrics["n_eval"] == 200
  mean = heads.fit_head(rating_file, heads.HeadConfig(head="mean", target="rating"))
  assert mean.metrics["rmse"] > 5 * head.metrics["rmse"]


def test_logistic_head_separates_planted_classes(rating_file):
  head = heads.fit_head(rating_file, heads.HeadConfig(head="logistic", target="click"))
  assert head.metrics["accuracy"] >= 0.95
  assert head.metrics["auc"] >= 0.99


def test_gbdt_and_tree_learn_something(rating_file):
  mean = heads.fit_head(rating_file, heads.HeadConfig(head="mean", target="rating"))
  for name in ("gbdt", "tree"):
    head = heads.fit_head(rating_file, heads.HeadConfig(head=name, target="rating",
                                                        inputs=("pooled_mean",)))
    assert head.metrics["rmse"] < 0.8 * mean.metrics["rmse"], name


def test_id_baseline_recovers_planted_biases(tmp_path):
  path = write_planted(str(tmp_path / "ids.parquet"), kind="ids", noise=0.2,
                       splits={"train": 3000, "test": 300})
  ids = heads.fit_head(path, heads.HeadConfig(head="linear", target="rating",
                                              inputs=("ids",)))
  emb = heads.fit_head(path, heads.HeadConfig(head="linear", target="rating"))
  # Bias sd sqrt(2 * .8^2) ~ 1.13 is what the embeddings (pure noise) leave.
  assert emb.metrics["rmse"] > 0.9
  assert ids.metrics["rmse"] < 0.45


def test_mlp_is_deterministic_and_learns(rating_file):
  cfg = heads.HeadConfig(head="mlp", target="click", seed=3,
                         mlp=heads.MLPConfig(hidden=(16,), max_epochs=40, patience=5,
                                                 batch_size=64, learning_rate=3e-3))
  a = heads.fit_head(rating_file, cfg)
  b = heads.fit_head(rating_file, cfg)
  _, splits = heads.load_features(rating_file)
  np.testing.assert_array_equal(a.predict(splits["test"]), b.predict(splits["test"]))
  assert a.metrics["accuracy"] >= 0.9
  c = heads.fit_head(rating_file, cfg.__class__(**{**cfg.__dict__, "seed": 4}))
  assert not np.array_equal(a.predict(splits["test"]), c.predict(splits["test"]))


@pytest.mark.parametrize("name,inputs", [("tree", ("ids", "pooled_mean")),
                                         ("mlp", ())])
def test_save_load_round_trip(rating_file, tmp_path, name, inputs):
  cfg = heads.HeadConfig(head=name, target="rating", inputs=inputs,
                         mlp=heads.MLPConfig(hidden=(8,), max_epochs=5))
  head = heads.fit_head(rating_file, cfg)
  head.save(str(tmp_path / "h"))
  assert not [f for f in os.listdir(tmp_path / "h") if f.startswith(".tmp")]
  loaded = heads.FittedHead.load(str(tmp_path / "h"))
  _, splits = heads.load_features(rating_file)
  np.testing.assert_allclose(loaded.predict(splits["test"]), head.predict(splits["test"]),
                             rtol=1e-6)
  assert loaded.metrics == json.loads(json.dumps(head.metrics))


def test_nan_features_name_the_column(tmp_path):
  path = write_planted(str(tmp_path / "nan.parquet"), nan_row=7)
  with pytest.raises(heads.NonFiniteFeatureError, match="'pooled_mean'.*first at row 7"):
    heads.fit_head(path, heads.HeadConfig())


def test_missing_target_names_the_column(tmp_path):
  path = write_planted(str(tmp_path / "nolabel.parquet"), drop_labels=True)
  with pytest.raises(heads.MissingTargetError, match="'label'.*split 'train'"):
    heads.fit_head(path, heads.HeadConfig(head="logistic", target="click"))


def test_empty_split_is_an_error(tmp_path):
  path = write_planted(str(tmp_path / "notest.parquet"),
                       splits={"train": 50, "validation": 10})
  with pytest.raises(heads.EmptySplitError, match="split 'test'"):
    heads.fit_head(path, heads.HeadConfig())
  path = write_planted(str(tmp_path / "noval.parquet"), splits={"train": 50, "test": 10})
  # MLP without a validation split early-stops on a fixed part of train instead.
  head = heads.fit_head(path, heads.HeadConfig(
      head="mlp", mlp=heads.MLPConfig(hidden=(4,), max_epochs=3)))
  assert head.metrics["n_train"] == 45


def test_schema_mismatches(rating_file, tmp_path):
  with pytest.raises(heads.SchemaMismatchError, match="'item_span'"):
    heads.fit_head(rating_file, heads.HeadConfig(inputs=("item_span",)))
  head = heads.fit_head(rating_file, heads.HeadConfig(inputs=("pooled_mean",)))
  other = write_planted(str(tmp_path / "d6.parquet"), dim=6)
  _, splits = heads.load_features(other)
  with pytest.raises(heads.SchemaMismatchError, match=r"'pooled_mean' float32\[8\]"):
    head.predict(splits["test"])
  plain = str(tmp_path / "plain.parquet")
  pq.write_table(pa.table({"x": [1.0]}), plain)
  with pytest.raises(heads.SchemaMismatchError, match="p5jax.features"):
    heads.fit_head(plain, heads.HeadConfig())
  with pytest.raises(heads.HeadError, match="'linear' predicts"):
    heads.fit_head(rating_file, heads.HeadConfig(head="linear", target="click"))


def test_generation_rows_from_predictions_and_metrics(tmp_path):
  preds = tmp_path / "preds.jsonl"
  preds.write_text("\n".join(json.dumps(r) for r in [
      {"prediction": "4.0", "target": "5.0"}, {"prediction": "3.0", "target": "3.0"},
      {"prediction": "oops", "target": "2.0"}]))
  (row,) = heads.generation_rows(str(preds))
  assert row["rmse"] == pytest.approx(np.sqrt(0.5)) and row["mae"] == pytest.approx(0.5)
  assert row["invalid"] == 1 and row["n_eval"] == 2
  metrics = tmp_path / "m.jsonl"
  metrics.write_text(json.dumps({"step": 1, "rmse": {"value": 0.5}, "mae": 0.4}) + "\n")
  (row,) = heads.generation_rows(str(metrics))
  assert (row["rmse"], row["mae"]) == (0.5, 0.4)


def test_generation_rows_from_results_json(tmp_path):
  results = tmp_path / "results.json"
  results.write_text(json.dumps({"rows": [
      {"task": "p5_x_rating_1_1", "prompt": "1-1", "examples": 7, "rmse": 1.25, "mae": 1.0},
      {"task": "p5_x_rating_1_4", "prompt": "1-4", "examples": 7, "accuracy": 64.0,
       "auc": 55.0},
      {"task": "p5_x_sequential_2_3", "examples": 7, "hr@10": 0.1}], "step": 4}))
  rows = {r["method"]: r for r in heads.generation_rows(str(results))}
  assert sorted(rows) == ["generation p5_x_rating_1_1", "generation p5_x_rating_1_4"]
  assert rows["generation p5_x_rating_1_1"] == {
      "rmse": 1.25, "mae": 1.0, "method": "generation p5_x_rating_1_1", "target": "rating",
      "n_eval": 7}
  click = rows["generation p5_x_rating_1_4"]
  assert click["target"] == "click" and click["accuracy"] == pytest.approx(0.64)
  assert click["auc"] == pytest.approx(0.55)


def test_compare_table(rating_file, tmp_path):
  preds = tmp_path / "preds.jsonl"
  preds.write_text(json.dumps({"prediction": "3.0", "target": "4.0"}))
  rows = heads.compare(rating_file, "rating", ["mean", "linear", "logistic"],
                       [str(preds)])
  table = heads.compare_table(rows)
  methods = [r["method"] for r in rows]
  assert methods == ["generation", "training mean", "linear on P5 features",
                     "linear on ID baseline"]
  assert table.count("\n") == 1 + len(rows)
  assert "| generation | rating | 1.0000 | 1.0000 |" in table


def test_cli_prints_one_json_line_and_named_errors(rating_file, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "p5jax.fit_head", f"--features={rating_file}",
       "--head=linear", "--target=rating", f"--out={tmp_path / 'h'}"],
      capture_output=True, text=True, env=env, check=True)
  metrics = json.loads(out.stdout.strip().splitlines()[-1])
  assert metrics["head"] == "linear" and metrics["rmse"] < 0.13
  assert (tmp_path / "h" / "head.json").exists()
  bad = subprocess.run(
      [sys.executable, "-m", "p5jax.fit_head", f"--features={rating_file}",
       "--inputs=nope"], capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and "SchemaMismatchError" in bad.stderr
  assert "'nope'" in bad.stderr
