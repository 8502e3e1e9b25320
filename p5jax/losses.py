"""Token-level cross-entropy for sequence models, T5X style.

`compute_weighted_cross_entropy` is the loss of `models.EncoderDecoderModel`:
cross-entropy against (optionally label-smoothed) one-hot targets, plus T5's
auxiliary *z-loss* ``z_loss * log(Z)^2`` that keeps the softmax normaliser
near 1 (stabilises bf16 training), weighted per token and summed, then divided
by a loss normalising factor.

Loss normalising factor (T5X semantics):
  * ``None``: the weighted sum over tokens (T5X default with Adafactor).
  * a float: the sum divided by that constant.
  * a `SpecialLossNormalizingFactor` (or its name as a string, for gin):
    ``NUM_REAL_TARGET_TOKENS`` (sum of weights, i.e. per-token mean),
    ``NUM_TOTAL_TARGET_TOKENS`` (all positions incl. padding), or
    ``AVERAGE_PER_SEQUENCE`` (each sequence's weights renormalised to sum to 1,
    divided by the number of sequences).
"""
import enum
from typing import Any, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array


class SpecialLossNormalizingFactor(enum.Enum):
  """Loss normalisers computed from the batch (T5X names)."""
  NUM_REAL_TARGET_TOKENS = 1
  NUM_TOTAL_TARGET_TOKENS = 2
  AVERAGE_PER_SEQUENCE = 3


LossNormalizingFactor = Optional[Union[float, int, str, SpecialLossNormalizingFactor]]


def cross_entropy_with_logits(logits_BxLxV: Array, targets_BxLxV: Array,
                              z_loss: float) -> Tuple[Array, Array]:
  """Per-token cross-entropy against soft targets, plus z-loss.

  Args:
    logits_BxLxV: [..., V] unnormalised logits.
    targets_BxLxV: [..., V] target distribution (one-hot or smoothed).
    z_loss: coefficient of ``log(Z)^2``.

  Returns:
    (loss [...], z_loss [...]); ``loss`` already includes the z-loss term.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_softmax = logits - log_z[..., None]
  loss = -jnp.sum(targets_BxLxV * log_softmax, axis=-1)
  total_z_loss = z_loss * jnp.square(log_z)
  return loss + total_z_loss, total_z_loss


def compute_weighted_cross_entropy(
    logits: Array, targets: Array, weights: Optional[Array] = None,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
    loss_normalizing_factor: Optional[float] = None) -> Tuple[Array, Array, Array]:
  """Weighted, summed (and optionally normalised) cross-entropy.

  Args:
    logits: [B, L, V].
    targets: [B, L] int token ids.
    weights: [B, L] per-token weights (0 = ignore, e.g. padding), or None.
    label_smoothing: mass spread uniformly over the other V - 1 tokens.
    z_loss: z-loss coefficient.
    loss_normalizing_factor: divide the sums by this, or None.

  Returns:
    (total loss, total z-loss, weight sum) as scalars.
  """
  if logits.ndim != targets.ndim + 1:
    raise ValueError(f"logits {logits.shape} must have one more axis than targets "
                     f"{targets.shape}.")
  vocab_size = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = (1.0 - confidence) / (vocab_size - 1)
  # Entropy of the smoothed target: subtracting it makes a perfect prediction
  # score 0 whatever the smoothing.
  normalizing_constant = -(confidence * jnp.log(confidence) +
                           (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20))
  soft_targets = (jax.nn.one_hot(targets, vocab_size) * (confidence - low_confidence)
                  + low_confidence)
  loss, z = cross_entropy_with_logits(logits, soft_targets, z_loss)
  loss = loss - normalizing_constant
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  total_loss = jnp.sum(loss * weights)
  total_z = jnp.sum(z * weights)
  if loss_normalizing_factor is not None:
    total_loss = total_loss / loss_normalizing_factor
    total_z = total_z / loss_normalizing_factor
  return total_loss, total_z, jnp.sum(weights)


def _as_special(factor: LossNormalizingFactor):
  if isinstance(factor, str):
    try:
      return SpecialLossNormalizingFactor[factor.upper()]
    except KeyError as e:
      raise ValueError(f"loss_normalizing_factor={factor!r}: expected a number, None or one of "
                       f"{[m.name for m in SpecialLossNormalizingFactor]}.") from e
  return factor


def get_loss_normalizing_factor_and_weights(
    loss_normalizing_factor: LossNormalizingFactor,
    batch: Mapping[str, Any]) -> Tuple[Optional[Union[float, Array]], Array]:
  """Resolves the normaliser and per-token weights for one batch (T5X contract).

  Weights are ``batch['decoder_loss_weights']`` when present, else
  ``decoder_target_tokens > 0``.

  Returns:
    (normalizing factor (None, float or scalar array), weights [B, L] float32).
  """
  targets = batch["decoder_target_tokens"]
  weights = batch.get("decoder_loss_weights")
  if weights is None:
    weights = targets > 0
  weights = jnp.asarray(weights, jnp.float32)
  factor = _as_special(loss_normalizing_factor)
  if not isinstance(factor, SpecialLossNormalizingFactor):
    return (None if factor is None else float(factor)), weights
  if factor is SpecialLossNormalizingFactor.NUM_REAL_TARGET_TOKENS:
    return jnp.maximum(jnp.sum(weights), 1e-8), weights
  if factor is SpecialLossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS:
    return float(targets.size), weights
  # AVERAGE_PER_SEQUENCE: every sequence contributes equally, whatever its length.
  per_seq = jnp.sum(weights, axis=-1, keepdims=True)
  weights = jnp.where(per_seq > 0, weights / jnp.maximum(per_seq, 1e-8), 0.0)
  return float(targets.shape[0]), weights
