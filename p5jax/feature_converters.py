"""Feature converter that carries P5's whole-word ids to the encoder.

`P5EncDecFeatureConverter` is `seqio.EncDecFeatureConverter` plus one model
feature, ``encoder_whole_word_ids``, taken from the task feature
``inputs_whole_word_ids`` (added by `p5jax.vocab.add_whole_word_ids`). Task
feature lengths stay ``{"inputs": .., "targets": ..}``; the whole-word ids
are trimmed, padded and packed exactly like ``inputs``.

Example, packed, task_feature_lengths = {"inputs": 8, "targets": 4}::

  ds = [{"inputs": [7, 8, 5, 1], "inputs_whole_word_ids": [1, 1, 2, 0],
         "targets": [3, 1]},
        {"inputs": [8, 4, 1], "inputs_whole_word_ids": [1, 2, 0],
         "targets": [4, 1]}]

  converted_ds = [{
      "encoder_input_tokens":   [7, 8, 5, 1, 8, 4, 1, 0],
      "encoder_whole_word_ids": [1, 1, 2, 0, 1, 2, 0, 0],
      "encoder_segment_ids":    [1, 1, 1, 1, 2, 2, 2, 0],
      "encoder_positions":      [0, 1, 2, 3, 0, 1, 2, 0],
      "decoder_target_tokens":  [3, 1, 4, 1],
      ...  # decoder features as in seqio.EncDecFeatureConverter
  }]

Word ids restart at 1 in every packed segment, so the model can embed them
without knowing about packing.
"""
from typing import Mapping

import seqio
import tensorflow as tf

WHOLE_WORD_TASK_FEATURE = "inputs_whole_word_ids"
WHOLE_WORD_MODEL_FEATURE = "encoder_whole_word_ids"


class MissingWholeWordIdsError(ValueError):
  """The task dataset lacks ``inputs_whole_word_ids``."""


def _shift_whole_word_ids(ex):
  ex = dict(ex)
  ex[WHOLE_WORD_TASK_FEATURE] = ex[WHOLE_WORD_TASK_FEATURE] + 1
  return ex


class P5EncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """EncDecFeatureConverter that also outputs ``encoder_whole_word_ids``."""

  MODEL_FEATURES = {
      **seqio.EncDecFeatureConverter.MODEL_FEATURES,
      WHOLE_WORD_MODEL_FEATURE: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    d = dict(super()._convert_example(features))
    # Undo the +1 shift of `_convert_features`; padding becomes 0 again.
    d[WHOLE_WORD_MODEL_FEATURE] = tf.maximum(features[WHOLE_WORD_TASK_FEATURE] - 1, 0)
    return d

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    if WHOLE_WORD_TASK_FEATURE not in ds.element_spec:
      raise MissingWholeWordIdsError(
          f"P5EncDecFeatureConverter needs the task feature "
          f"'{WHOLE_WORD_TASK_FEATURE}' (got {sorted(ds.element_spec)}). Add "
          "p5jax.vocab.add_whole_word_ids after append_eos_after_trim in the "
          "task's preprocessors, or use seqio.EncDecFeatureConverter.")
    spec = ds.element_spec[WHOLE_WORD_TASK_FEATURE]
    if spec.dtype != tf.int32 or spec.shape.rank != 1:
      raise MissingWholeWordIdsError(
          f"'{WHOLE_WORD_TASK_FEATURE}' must be int32 rank 1, got {spec}")
    # SeqIO's packing drops 0s as padding, which would shift ids whose EOS
    # position is 0 against the tokens; pack ids + 1 (no zeros) instead.
    ds = ds.map(_shift_whole_word_ids, num_parallel_calls=tf.data.AUTOTUNE)
    lengths = dict(task_feature_lengths)
    lengths[WHOLE_WORD_TASK_FEATURE] = task_feature_lengths["inputs"]
    ds = self._pack_or_pad(ds, lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths[WHOLE_WORD_MODEL_FEATURE] = task_feature_lengths["inputs"]
    return lengths
