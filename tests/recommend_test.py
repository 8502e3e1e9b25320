"""Tests for `python -m p5jax.recommend` on a run dir made from a random tiny model."""
import os
import re

import pytest

from p5jax import checkpoints
from p5jax import evaluation
from p5jax import partitioning
from p5jax import recommend
from p5jax import vocab as vocab_lib
from p5jax.data import schema
from tests import evaluation_test

CONFIG_GIN = """
from __gin__ import dynamic_registration
from p5jax import feature_converters
from p5jax import models
from p5jax import network
from p5jax import vocab

# Macros:
MODEL = @models.EncoderDecoderModel()
TASK_MODULE = 'tasks.mixtures'
VOCAB = @vocab.get_vocabulary()

models.EncoderDecoderModel.feature_converter_cls = @feature_converters.P5EncDecFeatureConverter
models.EncoderDecoderModel.input_vocabulary = %VOCAB
models.EncoderDecoderModel.module = @network.Transformer()
models.EncoderDecoderModel.output_vocabulary = %VOCAB
network.T5Config.d_ff = 32
network.T5Config.d_model = 16
network.T5Config.dropout_rate = 0.0
network.T5Config.head_dim = 8
network.T5Config.num_decoder_layers = 1
network.T5Config.num_encoder_layers = 1
network.T5Config.num_heads = 2
network.T5Config.vocab_size = {vocab_size}
network.T5Config.whole_word_vocab_size = 64
network.Transformer.config = @network.T5Config()
vocab.get_vocabulary.dataset = 'ml100k'
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = evaluation_test.prepared_root(tmp_path_factory)
  schema.set_data_root(root)
  model = evaluation_test.tiny_model()
  params, _ = evaluation.random_params(model, partitioning.Partitioner())
  folder = tmp_path_factory.mktemp("run")
  manager = checkpoints.CheckpointManager(str(folder))
  manager.save(5, {"step": 5, "params": params})
  manager.close()
  vocab_size = vocab_lib.model_vocab_size(vocab_lib.get_vocabulary("ml100k"))
  (folder / "config.gin").write_text(CONFIG_GIN.format(vocab_size=vocab_size))
  yield dict(dir=str(folder), root=root, catalog=evaluation.Catalog.load("ml100k"))
  schema.set_data_root(None)


def test_recommend_prints_history_and_distinct_unseen_topk(run_dir, capsys):
  catalog = run_dir["catalog"]
  user = sorted(catalog.sequences)[0]
  code = recommend.main([f"--model_dir={run_dir['dir']}", f"--user=user_{user}", "--topk=7",
                         f"--data_dir={run_dir['root']}"])
  out = capsys.readouterr().out
  assert code == 0, out
  history, recs = out.split("top 7 recommendations")
  assert f"user_{user} ({len(catalog.sequences[user])} interactions)" in history
  assert f"item_{catalog.sequences[user][-1]}\t{catalog.titles[catalog.sequences[user][-1]]}" \
      in history
  lines = re.findall(r"^\s+(\d+)\. item_(\S+)\t(.+)\t\(log p = (-?[\d.]+)\)$", recs, re.M)
  assert [int(r[0]) for r in lines] == list(range(1, 8))
  ids = [r[1] for r in lines]
  assert len(set(ids)) == 7 and set(ids) <= set(catalog.item_ids)
  assert not set(ids) & set(catalog.sequences[user])  # seen items excluded by default
  assert all(catalog.titles[i] == t for i, t, _ in (r[1:] for r in lines))


def test_unknown_user_exits_2_with_hint(run_dir, capsys):
  code = recommend.main([f"--model_dir={run_dir['dir']}", "--user=999999", "--raw_id",
                         f"--data_dir={run_dir['root']}"])
  err = capsys.readouterr().err
  assert code == recommend.EXIT_UNKNOWN_USER == 2
  assert "unknown raw dataset user id '999999'" in err
  assert "--list_users" in err and "datamaps.json" in err
