"""Tests for p5jax.evaluation on a tiny prepared ML-100K-format fixture.

A random 1-layer model is enough for the glue under test: constrained ranking
must return valid distinct catalog items, SeqIO's metrics must equal a direct
computation on the same predictions, candidate ranking must put a planted best
item first, and the results files must be written.
"""
import json
import math
import os
import re

import numpy as np
import pytest

from p5jax import evaluation
from p5jax import feature_converters
from p5jax import metrics
from p5jax import models
from p5jax import network
from p5jax import partitioning
from p5jax import vocab as vocab_lib
from p5jax.data import schema
from tests import fixtures

WORLD = {}  # fixtures.make_world defaults (smaller worlds lose users to the 5-core)


def prepared_root(tmp_path_factory) -> str:
  """Fixture data + vocabulary, prepared once per pytest session (shared by eval tests)."""
  root = os.path.join(str(tmp_path_factory.getbasetemp()), "p5jax_eval_data")
  folder = schema.dataset_dir("ml100k", os.path.join(root, "data"))
  if not os.path.exists(os.path.join(folder, vocab_lib.SPIECE_FILENAME)):
    fixtures.prepared_root(root, "ml-100k", **WORLD)
    vocab_lib.build_dataset_vocabulary(folder, "ml100k", vocab_size=384)
  return os.path.join(root, "data")


def tiny_model():
  vocabulary = vocab_lib.get_vocabulary("ml100k")
  config = network.T5Config(
      vocab_size=vocab_lib.model_vocab_size(vocabulary), d_model=16, num_heads=2, head_dim=8,
      d_ff=32, num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
      whole_word_vocab_size=64)
  return models.EncoderDecoderModel(
      network.Transformer(config), vocabulary, vocabulary,
      feature_converter_cls=feature_converters.P5EncDecFeatureConverter)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = prepared_root(tmp_path_factory)
  schema.set_data_root(root)
  import tasks.mixtures  # pylint: disable=g-import-not-at-top,unused-import
  model = tiny_model()
  partitioner = partitioning.Partitioner(num_partitions=2)
  params, axes = evaluation.random_params(model, partitioner)
  runner = evaluation.ModelRunner(model, params, axes, partitioner)
  yield dict(root=root, model=model, partitioner=partitioner, runner=runner,
             catalog=evaluation.Catalog.load("ml100k"))
  schema.set_data_root(None)


def test_full_catalog_ranking_valid_distinct_unseen_and_metrics_match(setup):
  config = evaluation.EvalConfig(beam_size=20, batch_size=8, max_examples=8,
                                 exclude_history=True)
  result = evaluation.PromptEvaluator(setup["runner"], config).evaluate_task(
      "p5_ml100k_sequential_2_13")
  row = result.row
  assert (row["family"], row["prompt"], row["seen"], row["kind"]) == (
      "sequential", "2-13", False, evaluation.ITEM)
  assert {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"} <= set(row)
  catalog = setup["catalog"]
  users = [inp.split("user_")[1].split()[0] for inp in result.inputs]
  assert len(result.predictions) == row["examples"] == 8
  for user, ranked, scores in zip(users, result.predictions, result.scores):
    assert len(ranked) == 20 and len(set(ranked)) == 20
    assert set(ranked) <= set(catalog.item_ids)
    assert not set(ranked) & set(catalog.history(user, "test"))
    assert all(a >= b for a, b in zip(scores, scores[1:]))  # best first
  direct = metrics.ranking_metrics(result.targets, result.predictions)
  for k, v in direct.items():
    assert math.isclose(row[k], v), (k, row[k], v)
  assert result.targets == [catalog.sequences[u][-1] for u in users]


class PlantedRunner(evaluation.ModelRunner):
  """Scores 0 for the user's planted item (read from the prompt), -5 otherwise."""

  def __init__(self, base, items, planted):
    super().__init__(base.model, base.params, base.params_axes, base.partitioner)
    self.items, self.planted = items, planted

  def score_options(self, batch, options_BxCxT):
    vocab = self.model.input_vocabulary
    out = np.full(options_BxCxT.shape[:2], -5.0, np.float32)
    for b, tokens in enumerate(batch["encoder_input_tokens"]):
      match = re.search(r"user_(\d+)", vocab.decode(tokens.tolist()))
      if match:
        row = self.items.rows(np.array(self.items.indices([self.planted[match.group(1)]])))[0]
        out[b] = np.where((options_BxCxT[b] == row).all(-1), 0.0, -5.0)
    return out


def test_candidate_ranking_puts_planted_best_first(setup):
  catalog = setup["catalog"]
  planted = {user: seq[-1] for user, seq in catalog.sequences.items()}  # test targets
  items = evaluation.PromptEvaluator(setup["runner"]).item_index("ml100k")
  config = evaluation.EvalConfig(batch_size=8, candidate_batch_size=4, max_examples=8)
  result = evaluation.PromptEvaluator(PlantedRunner(setup["runner"], items, planted), config) \
      .evaluate_task("p5_ml100k_sequential_2_7")
  assert result.info.kind == evaluation.CANDIDATES
  assert result.row["hr@1"] == 1.0 and result.row["ndcg@10"] == 1.0
  for ranked, target in zip(result.predictions, result.targets):
    assert ranked[0] == target and len(set(ranked)) == len(ranked) == 20


def test_score_options_equals_score_batch(setup):
  runner = setup["runner"]
  rng = np.random.RandomState(0)
  enc = rng.randint(3, 200, size=(4, 12)).astype(np.int32)
  enc[:, -3:] = 0
  options = rng.randint(3, 200, size=(4, 3, 5)).astype(np.int32)
  options[:, :, 3] = 1
  options[:, :, 4] = 0
  got = runner.score_options({"encoder_input_tokens": enc}, options)
  flat_targets = options.reshape(12, 5)
  flat = {"encoder_input_tokens": np.repeat(enc, 3, axis=0),
          "decoder_target_tokens": flat_targets,
          "decoder_input_tokens": np.pad(flat_targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": (flat_targets > 0).astype(np.int32)}
  want = runner.score_batch(flat).reshape(4, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_write_results_files(tmp_path):
  rows = [
      {"task": "p5_ml100k_sequential_2_13", "prompt": "2-13", "family": "sequential",
       "seen": False, "examples": 8, "hr@1": 0.125, "hr@5": 0.25, "hr@10": 0.5,
       "ndcg@5": 0.2, "ndcg@10": 0.3},
      {"task": "p5_ml100k_rating_1_1", "prompt": "1-1", "family": "rating", "seen": True,
       "examples": 8, "rmse": 1.2, "mae": 0.9, "invalid": 1.0},
  ]
  paths = evaluation.write_results(rows, str(tmp_path / "eval"), {"step": 3})
  md = open(paths["md"]).read().splitlines()
  assert md[0].startswith("| task | prompt | family | seen | examples | hr@1 |")
  assert "| p5_ml100k_sequential_2_13 | 2-13 | sequential | unseen | 8 | 0.1250 |" in md[2]
  assert md[3].split(" | ")[5] == "–"  # rating row has no hr@1
  payload = json.load(open(paths["json"]))
  assert payload["step"] == 3 and payload["rows"][1]["rmse"] == 1.2
  assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(tmp_path / "eval")) == ["results.json", "results.md", "results.png"]
