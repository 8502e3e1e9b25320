"""Tests for p5jax.features / p5jax.embed: pooling, ID spans, end-to-end export.

The end-to-end test registers a tiny in-memory SeqIO task (P5-style prompts),
trains a tiny SentencePiece model, builds a tiny random `EncoderDecoderModel`
sharded on a 2x2 mesh of fake CPU devices, and exports features twice.
"""
import os

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf

from p5jax import checkpoints
from p5jax import embed
from p5jax import features
from p5jax import heads
from p5jax import feature_converters
from p5jax import models
from p5jax import network
from p5jax import partitioning
from p5jax import vocab as vocab_lib

D_MODEL = 16
PROMPTS = {
    "train": [(f"What star rating will user_{u} give item_{i} ?", f"{1 + (u + i) % 5}.0")
              for u in range(1, 9) for i in (11, 205, 3071)],
    "test": [("Will user_7 like item_205 ? user_7 watched 3 movies .", "yes"),
             ("Will user_12 like item_9 ?", "no"),
             ("A prompt without ids .", "no")],
}


def test_masked_mean_and_empty_mask():
  x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
  mask = np.array([[1, 0, 1], [0, 0, 0]], bool)
  out = np.asarray(features.masked_mean(x, mask))
  np.testing.assert_allclose(out[0], (x[0, 0] + x[0, 2]) / 2)
  np.testing.assert_array_equal(out[1], [0, 0])


def _pieces(*rows):
  """A toy piece table and token rows built from lists of piece strings."""
  table = ["<pad>", "</s>", "<unk>"]
  ids = []
  for row in rows:
    r = []
    for p in row:
      if p not in table:
        table.append(p)
      r.append(table.index(p))
    ids.append(r)
  return np.array(table, dtype=object), np.array(ids, np.int32)


def test_span_finder_uses_whole_words():
  s = "\u2581"
  pieces, tokens = _pieces(
      [s + "user", "_", "2", "3", s + "likes", s + "item", "_", "7", s + "?", s + "user",
       "_", "2", "3", "</s>"],
      [s + "user", "_", "9", s + "item", "_", "4", "2", ",", s + "item", "_", "5", "</s>", "<pad>",
       "<pad>"])
  wwids = features.whole_word_ids_from_pieces(tokens, pieces)
  user_mask, item_mask, users, items = features.SpanFinder(pieces)(tokens, wwids)
  assert users == ["23", "9"] and items == ["7", "42"]
  # Both mentions of user_23; the first item only ("item_42," keeps its comma).
  np.testing.assert_array_equal(np.nonzero(user_mask[0])[0], [0, 1, 2, 3, 9, 10, 11, 12])
  np.testing.assert_array_equal(np.nonzero(item_mask[0])[0], [5, 6, 7])
  np.testing.assert_array_equal(np.nonzero(item_mask[1])[0], [3, 4, 5, 6, 7])


def test_parse_target():
  assert features.parse_target("4.0") == (4.0, None)
  assert features.parse_target(" Yes ") == (None, 1)
  assert features.parse_target("dislike") == (None, 0)
  assert features.parse_target("item_7") == (None, None)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("embed")
  texts = [p for split in PROMPTS.values() for pair in split for p in pair]
  spm_path = vocab_lib.train_vocabulary(texts * 4, str(tmp / "spiece.model"), vocab_size=256)
  vocabulary = seqio.SentencePieceVocabulary(spm_path, extra_ids=vocab_lib.EXTRA_IDS)
  task_name = f"features_test_task_{os.getpid()}"

  def source(split, shuffle_files, seed=None):
    del shuffle_files, seed
    inputs, targets = zip(*PROMPTS[split])
    return tf.data.Dataset.from_tensor_slices({"inputs": list(inputs),
                                               "targets": list(targets)})

  output_features = {k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")}
  seqio.TaskRegistry.add(
      task_name, seqio.FunctionDataSource(source, splits=("train", "test")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim,
                     vocab_lib.add_whole_word_ids],
      output_features=output_features)
  cfg = network.T5Config(vocab_size=vocab_lib.model_vocab_size(vocabulary), d_model=D_MODEL,
                         num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                         num_decoder_layers=1, dropout_rate=0.0, whole_word_vocab_size=64)
  model = models.EncoderDecoderModel(
      network.Transformer(cfg), vocabulary, vocabulary,
      feature_converter_cls=feature_converters.P5EncDecFeatureConverter)
  partitioner = partitioning.Partitioner(num_partitions=2)
  config = features.EmbedConfig(task=task_name, splits=("train", "test"), batch_size=4,
                                inputs_length=64, targets_length=8, score_yes_no=True)
  params, axes = features.init_params(model, partitioner, features.model_input_shapes(config))
  # One embedder (one compilation) serves every export below.
  embedder = features.Embedder(model, params, axes, partitioner, config.batch_size,
                               score_yes_no=True)
  yield dict(tmp=tmp, model=model, partitioner=partitioner, config=config, params=params,
             axes=axes, embedder=embedder)
  seqio.TaskRegistry.remove(task_name)


def _table(path):
  return pq.read_table(path).to_pydict()


def test_export_shapes_fields_and_determinism(setup):
  s = setup
  paths = []
  converter = feature_converters.P5EncDecFeatureConverter(pack=False)
  for run in range(2):
    paths.append(str(s["tmp"] / f"f{run}.parquet"))
    features.export_features(s["embedder"], s["config"], converter, paths[-1],
                             progress=False)
  schema = features.read_schema(paths[0])
  assert dict(schema.vector_columns) == {c: D_MODEL for c in features.VECTOR_COLUMNS}
  assert schema.score_columns == {"click": "yes_no_logit"}
  a, b = _table(paths[0]), _table(paths[1])
  assert a == b  # bit-identical across runs
  n_train, n_test = len(PROMPTS["train"]), len(PROMPTS["test"])
  assert a["split"] == ["train"] * n_train + ["test"] * n_test
  assert a["example_index"] == list(range(n_train)) + list(range(n_test))
  for col in features.VECTOR_COLUMNS:
    arr = np.array(a[col], np.float32)
    assert arr.shape == (n_train + n_test, D_MODEL)
    assert np.isfinite(arr).all()
  assert a["user_id"][:3] == ["1", "1", "1"] and a["item_id"][:3] == ["11", "205", "3071"]
  assert a["user_id"][n_train:] == ["7", "12", ""]
  assert a["has_item_span"][n_train:] == [True, True, False]
  assert np.all(np.array(a["item_span"][-1]) == 0)  # no item word -> zeros
  assert a["rating"][0] == 3.0 and a["label"][0] is None
  assert a["label"][n_train:] == [1, 0, 0] and a["rating"][n_train] is None
  assert all(np.isfinite(a["yes_no_logit"]))
  # Spans differ from the prompt mean (they pool different tokens).
  assert not np.allclose(a["user_span"][0], a["pooled_mean"][0])
  # The file feeds a head directly.
  _, splits = heads.load_features(paths[0])
  assert len(splits["train"]) == n_train


def test_pooled_mean_matches_unjitted_encoder(setup):
  s = setup
  path = str(s["tmp"] / "check.parquet")
  cfg = features.EmbedConfig(**{**s["config"].__dict__, "splits": ("test",)})
  converter = feature_converters.P5EncDecFeatureConverter(pack=False)
  features.export_features(s["embedder"], cfg, converter, path, progress=False)
  rows = _table(path)
  batch = next(features.task_batches(cfg.task, "test", converter, cfg))
  module = s["model"].module
  params = jax.device_get(s["params"])
  enc = module.apply({"params": params}, batch["encoder_input_tokens"],
                     encoder_whole_word_ids=batch["encoder_whole_word_ids"],
                     enable_dropout=False, method=module.encode)
  mask = batch["encoder_input_tokens"] > 0
  expected = (np.asarray(enc) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(np.array(rows["pooled_mean"]), expected, rtol=1e-4, atol=1e-5)


def test_params_round_trip_through_checkpoint(setup):
  s = setup
  ckpt = str(s["tmp"] / "params_ckpt")
  checkpoints.save_params(ckpt, s["params"])
  params, _ = embed.load_params(ckpt, s["model"], s["partitioner"], s["config"])
  for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(s["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_failed_export_leaves_no_file(setup, tmp_path):
  s = setup
  cfg = features.EmbedConfig(**{**s["config"].__dict__, "splits": ("validation",)})
  out = str(tmp_path / "never.parquet")
  with pytest.raises(Exception):
    embed.run(s["model"], s["params"], s["axes"], s["partitioner"], cfg, out, progress=False)
  assert os.listdir(tmp_path) == []
