"""Tests for P5EncDecFeatureConverter (whole-word ids with and without packing)."""
import numpy as np
import pytest
import seqio
from seqio import test_utils
import tensorflow as tf

from p5jax import feature_converters


def _ds(examples):
  sig = {k: tf.TensorSpec([None], tf.int32) for k in examples[0]}
  return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=sig)


EXAMPLES = [
    {"inputs": [7, 8, 5, 1], "inputs_whole_word_ids": [1, 1, 2, 0], "targets": [3, 1]},
    {"inputs": [8, 4, 1], "inputs_whole_word_ids": [1, 2, 0], "targets": [4, 1]},
]


def test_unpacked():
  conv = feature_converters.P5EncDecFeatureConverter(pack=False)
  ds = conv(_ds(EXAMPLES), {"inputs": 5, "targets": 3})
  test_utils.assert_dataset(ds, [
      {"encoder_input_tokens": [7, 8, 5, 1, 0],
       "encoder_whole_word_ids": [1, 1, 2, 0, 0],
       "decoder_target_tokens": [3, 1, 0],
       "decoder_input_tokens": [0, 3, 1],
       "decoder_loss_weights": [1, 1, 0]},
      {"encoder_input_tokens": [8, 4, 1, 0, 0],
       "encoder_whole_word_ids": [1, 2, 0, 0, 0],
       "decoder_target_tokens": [4, 1, 0],
       "decoder_input_tokens": [0, 4, 1],
       "decoder_loss_weights": [1, 1, 0]},
  ])


def test_packed_ids_restart_per_segment():
  conv = feature_converters.P5EncDecFeatureConverter(pack=True)
  ds = conv(_ds(EXAMPLES), {"inputs": 8, "targets": 4})
  test_utils.assert_dataset(ds, [{
      "encoder_input_tokens": [7, 8, 5, 1, 8, 4, 1, 0],
      "encoder_whole_word_ids": [1, 1, 2, 0, 1, 2, 0, 0],
      "encoder_segment_ids": [1, 1, 1, 1, 2, 2, 2, 0],
      "encoder_positions": [0, 1, 2, 3, 0, 1, 2, 0],
      "decoder_target_tokens": [3, 1, 4, 1],
      "decoder_input_tokens": [0, 3, 0, 4],
      "decoder_loss_weights": [1, 1, 1, 1],
      "decoder_segment_ids": [1, 1, 2, 2],
      "decoder_positions": [0, 1, 0, 1],
  }])


def test_packed_many_examples_stay_aligned_with_inputs():
  rng = np.random.default_rng(0)
  examples = []
  for _ in range(20):
    n = int(rng.integers(1, 6))
    inputs = list(rng.integers(3, 50, n)) + [1]
    new_word = rng.integers(0, 2, n)
    new_word[0] = 0
    words = list(np.cumsum(new_word) + 1) + [0]
    examples.append({"inputs": [int(x) for x in inputs],
                     "inputs_whole_word_ids": [int(x) for x in words],
                     "targets": [5, 1]})
  conv = feature_converters.P5EncDecFeatureConverter(pack=True)
  packed = list(conv(_ds(examples), {"inputs": 16, "targets": 8}).as_numpy_iterator())
  flat_ids = []
  for ex in packed:
    seg = ex["encoder_segment_ids"]
    # padding positions are 0 in both; every segment starts at word 1
    np.testing.assert_array_equal(ex["encoder_whole_word_ids"][seg == 0], 0)
    for s in range(1, seg.max() + 1):
      ids = ex["encoder_whole_word_ids"][seg == s]
      assert ids[0] == 1
      flat_ids.append(list(ids))
  assert flat_ids == [e["inputs_whole_word_ids"] for e in examples]


def test_trims_whole_word_ids_with_inputs():
  conv = feature_converters.P5EncDecFeatureConverter(pack=False, apply_length_check=False)
  ds = conv(_ds(EXAMPLES[:1]), {"inputs": 2, "targets": 3})
  ex = next(ds.as_numpy_iterator())
  np.testing.assert_array_equal(ex["encoder_input_tokens"], [7, 8])
  np.testing.assert_array_equal(ex["encoder_whole_word_ids"], [1, 1])


def test_model_feature_lengths():
  conv = feature_converters.P5EncDecFeatureConverter(pack=True)
  lengths = conv.get_model_feature_lengths({"inputs": 32, "targets": 8})
  assert lengths["encoder_whole_word_ids"] == 32
  assert lengths["decoder_target_tokens"] == 8


def test_missing_whole_word_ids_is_a_clear_error():
  examples = [{"inputs": [7, 1], "targets": [3, 1]}]
  conv = feature_converters.P5EncDecFeatureConverter(pack=False)
  with pytest.raises(feature_converters.MissingWholeWordIdsError,
                     match="add_whole_word_ids"):
    conv(_ds(examples), {"inputs": 4, "targets": 3})
