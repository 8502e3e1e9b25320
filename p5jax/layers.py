"""Flax linen building blocks of the T5 encoder-decoder (`network.py` wires them).

Every parameter carries logical axis names via `nn.with_logical_partitioning`
and key activations are constrained with `nn.with_logical_constraint`, so the
sharding of the whole model is decided by `p5jax/partitioning.py` alone
(logical names: ``batch, length, vocab, embed, mlp, heads, kv, relpos_buckets``).
Outside a mesh / rules context the constraints are no-ops.

Numerics follow T5 (and Hugging Face's `T5ForConditionalGeneration`, which the
parity tests compare against): no biases, no attention-logit scaling (T5 folds
``1/sqrt(head_dim)`` into the query initialisation), RMS norm without mean
subtraction, softmax in float32. Parameters are float32; activations use the
``dtype`` given to each module (float32 or bfloat16).

Masks follow T5X: a mask is a float array ``[B, 1, L_q, L_k]`` of 1 (attend) /
0 (blocked); masks and biases are combined and turned into an additive
attention bias inside `dot_product_attention`.

Autoregressive decoding uses a T5X-style ``cache`` collection: each decoder
self-attention keeps ``cached_key`` / ``cached_value`` ``[B, L_max, H, D]`` and a
scalar ``cache_index``; `MultiHeadDotProductAttention` with ``decode=True``
first creates the zeroed cache (initialisation pass with full-length inputs),
then appends one position per call. Each cross-attention (``cache_kv=True``)
stores its projected encoder keys/values ``cached_cross_key`` /
``cached_cross_value`` ``[B, S, H, D]`` in that same initialisation pass, so
decode steps neither re-project the encoder outputs nor copy them per beam.
"""
import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]
Axes = Tuple[Optional[str], ...]

# A large negative number instead of -inf keeps fully masked rows (padding
# queries) finite: their softmax becomes uniform instead of NaN.
_NEG_INF = -1e10

# T5 initialisers: variance scaling over fan-in for every kernel; the query
# kernel is additionally scaled by 1/sqrt(head_dim) (see MultiHeadDotProduct-
# Attention) because T5 does not scale attention logits.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_embed_init = nn.initializers.normal(stddev=1.0)


def _canonicalize_tuple(x: Union[int, Sequence[int]]) -> Tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _normalize_axes(axes: Tuple[int, ...], ndim: int) -> Tuple[int, ...]:
  return tuple(a if a >= 0 else ndim + a for a in axes)


class DenseGeneral(nn.Module):
  """Bias-free linear map over arbitrary input axes to arbitrary output features.

  Kernel shape is ``in_shape + features`` (e.g. ``[embed, heads, kv]`` for a
  query projection); it is initialised as the 2-D ``[prod(in), prod(features)]``
  matrix so that fan-in is the true fan-in, then reshaped.

  Attributes:
    features: output feature shape (int or tuple).
    axis: input axes contracted with the kernel.
    kernel_axes: logical axis names of the kernel, one per kernel dimension.
    dtype: computation dtype (params stay float32).
    kernel_init: initialiser of the 2-D kernel.
  """
  features: Union[int, Tuple[int, ...]]
  kernel_axes: Axes
  axis: Union[int, Tuple[int, ...]] = -1
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    features = _canonicalize_tuple(self.features)
    axis = _normalize_axes(_canonicalize_tuple(self.axis), inputs.ndim)
    in_shape = tuple(inputs.shape[a] for a in axis)
    kernel_shape = in_shape + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(
          f"DenseGeneral {self.name}: kernel_axes {self.kernel_axes} do not match "
          f"kernel shape {kernel_shape}.")
    flat_shape = (int(np.prod(in_shape)), int(np.prod(features)))

    def init(key, shape, dtype):
      return jnp.reshape(self.kernel_init(key, flat_shape, dtype), shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        kernel_shape, jnp.float32)
    kernel = jnp.asarray(kernel, self.dtype)
    inputs = jnp.asarray(inputs, self.dtype)
    contract = (axis, tuple(range(len(axis))))
    return lax.dot_general(inputs, kernel, (contract, ((), ())))


class Embed(nn.Module):
  """Token embedding table ``[vocab, embed]``; `attend` gives tied-head logits.

  Attributes:
    num_embeddings: vocabulary size V.
    features: embedding size D.
    dtype: dtype of the looked-up activations.
    embedding_init: initialiser (T5: standard normal).
    axes: logical names of the table dimensions.
  """
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  embedding_init: Initializer = default_embed_init
  axes: Axes = ("vocab", "embed")

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids_BxL: Array) -> Array:
    """ids [B, L] int -> embeddings [B, L, D] in ``dtype``."""
    if not jnp.issubdtype(ids_BxL.dtype, jnp.integer):
      raise ValueError(f"Embed {self.name}: ids must be integers, got {ids_BxL.dtype}.")
    # A gather (not a one-hot matmul): cheap on CPU/GPU and fine under sharding
    # because the table is replicated or split only over the `vocab` axis.
    return jnp.asarray(self.embedding, self.dtype)[ids_BxL]

  def attend(self, x_BxLxD: Array) -> Array:
    """Tied output head: x [B, L, D] -> logits [B, L, V] (x @ embedding^T)."""
    table = jnp.asarray(self.embedding, self.dtype)
    return jnp.einsum("bld,vd->blv", jnp.asarray(x_BxLxD, self.dtype), table)


class RMSNorm(nn.Module):
  """T5 layer norm: ``x / sqrt(mean(x^2) + eps) * scale`` (no mean, no bias).

  Statistics are computed in float32 whatever the activation dtype.
  """
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (features,), jnp.float32)
    x32 = jnp.asarray(x, jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * lax.rsqrt(var + self.epsilon)
    return jnp.asarray(y * scale, self.dtype)


def _activation(name: str) -> Callable[[Array], Array]:
  if name == "relu":
    return nn.relu
  if name == "gelu":
    # T5 v1.1 / HF "gelu_new": the tanh approximation.
    return functools.partial(nn.gelu, approximate=True)
  if name == "linear":
    return lambda x: x
  raise ValueError(f"Unknown MLP activation {name!r}; expected relu, gelu or linear.")


class MlpBlock(nn.Module):
  """T5 feed-forward block.

  ``activations=("relu",)`` is T5 v1.0 (``wo(relu(wi x))``);
  ``("gelu", "linear")`` is v1.1's gated GELU (``wo(gelu(wi_0 x) * wi_1 x)``).
  Dropout is applied to the hidden activations (as HF and T5X do).

  Attributes:
    d_ff: hidden size F.
    activations: one activation per input projection; >1 means gated.
    dropout_rate: dropout on the hidden activations.
    dtype: activation dtype.
  """
  d_ff: int
  activations: Sequence[str] = ("relu",)
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: Array, *, enable_dropout: bool = True) -> Array:
    """x [B, L, D] -> [B, L, D]."""
    gated = len(self.activations) > 1
    h_BxLxF = None
    for i, act in enumerate(self.activations):
      name = f"wi_{i}" if gated else "wi"
      h = DenseGeneral(self.d_ff, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                       name=name)(x_BxLxD)
      h = _activation(act)(h)
      h_BxLxF = h if h_BxLxF is None else h_BxLxF * h
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    h_BxLxF = nn.Dropout(self.dropout_rate)(h_BxLxF, deterministic=not enable_dropout)
    out = DenseGeneral(x_BxLxD.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype,
                       name="wo")(h_BxLxF)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


# ------------------------------------------------------------------ positions


def relative_position_bucket(relative_position: Array, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """Maps relative positions (key - query) to T5 bucket ids in ``[0, num_buckets)``.

  Half the buckets (all of them when causal) hold exact small distances, the
  rest log-spaced distances up to ``max_distance``; beyond that one bucket.
  Bidirectional buckets put keys after the query in the upper half. Causal
  buckets map every future key to bucket 0 (they are masked anyway).
  """
  ret = 0
  n = num_buckets
  if bidirectional:
    n //= 2
    ret += (relative_position > 0).astype(jnp.int32) * n
    distance = jnp.abs(relative_position)
  else:
    distance = jnp.maximum(-relative_position, 0)
  max_exact = n // 2
  is_small = distance < max_exact
  # Guard log(0); those entries take the `is_small` branch.
  safe = jnp.maximum(distance, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                       * (n - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, n - 1)
  return ret + jnp.where(is_small, distance, large)


class RelativePositionBiases(nn.Module):
  """T5 relative position bias shared by all layers of one stack.

  Hugging Face stores this table in the first layer of each stack and reuses
  the bias in the others; T5X keeps it at stack level. Both compute the same
  numbers; the converter maps HF's layer-0 table here.

  Attributes:
    num_buckets: number of relative position buckets.
    max_distance: distance beyond which all positions share one bucket.
    num_heads: attention heads H.
    dtype: dtype of the returned bias.
  """
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, q_len: int, k_len: int, bidirectional: bool = True) -> Array:
    """Returns the additive bias [1, H, q_len, k_len]."""
    table_HxR = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                     ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    rel_QxK = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    buckets_QxK = relative_position_bucket(rel_QxK, bidirectional, self.num_buckets,
                                           self.max_distance)
    bias_HxQxK = jnp.take(table_HxR, buckets_QxK, axis=1)
    return jnp.asarray(bias_HxQxK[None], self.dtype)


# ---------------------------------------------------------------- attention


def make_attention_mask(query_input: Array, key_input: Array,
                        pairwise_fn: Callable[[Array, Array], Array] = jnp.multiply,
                        dtype: DType = jnp.float32) -> Array:
  """[B, L_q] x [B, L_k] -> mask [B, 1, L_q, L_k] = pairwise_fn(q_i, k_j)."""
  mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
  return mask[:, None].astype(dtype)


def make_causal_mask(x_BxL: Array, dtype: DType = jnp.float32) -> Array:
  """[B, L] -> lower-triangular mask [B, 1, L, L]."""
  idx = jnp.broadcast_to(jnp.arange(x_BxL.shape[-1], dtype=jnp.int32), x_BxL.shape)
  return make_attention_mask(idx, idx, jnp.greater_equal, dtype)


def combine_masks(*masks: Optional[Array], dtype: DType = jnp.float32) -> Optional[Array]:
  """Logical AND of the non-None masks (None if all are None)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out.astype(dtype)


def combine_biases(*biases: Optional[Array]) -> Optional[Array]:
  """Sum of the non-None additive biases (None if all are None)."""
  biases = [b for b in biases if b is not None]
  if not biases:
    return None
  out = biases[0]
  for b in biases[1:]:
    out = out + b
  return out


def make_decoder_mask(decoder_target_tokens: Array, dtype: DType = jnp.float32,
                      decoder_segment_ids: Optional[Array] = None) -> Array:
  """Causal self-attention mask for teacher forcing: [B, L] -> [B, 1, L, L].

  Blocks future positions, padding (``decoder_target_tokens == 0``) and, when
  packed, attention across segments.
  """
  nonpad = decoder_target_tokens > 0
  masks = [make_causal_mask(decoder_target_tokens, dtype),
           make_attention_mask(nonpad, nonpad, dtype=dtype)]
  if decoder_segment_ids is not None:
    masks.append(make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal, dtype))
  return combine_masks(*masks, dtype=dtype)


def dot_product_attention(query_BxQxHxD: Array, key_BxKxHxD: Array, value_BxKxHxD: Array,
                          bias_BxHxQxK: Optional[Array] = None,
                          dropout_rng: Optional[Array] = None, dropout_rate: float = 0.0,
                          deterministic: bool = True, dtype: DType = jnp.float32) -> Array:
  """Unscaled T5 attention; logits and softmax in float32.

  Returns [B, Q, H, D] in ``dtype``.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", query_BxQxHxD, key_BxKxHxD,
                      preferred_element_type=jnp.float32)
  if bias_BxHxQxK is not None:
    logits = logits + jnp.asarray(bias_BxHxQxK, jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  weights = jnp.asarray(weights, dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, jnp.asarray(value_BxKxHxD, dtype))


class MultiHeadDotProductAttention(nn.Module):
  """T5 multi-head attention with optional T5X-style decoding caches.

  Two cached modes (both use the ``cache`` collection, see the module doc):

  * ``decode=True`` (decoder self-attention): ``cached_key`` / ``cached_value``
    ``[B, L_max, H, D_h]`` grow by one position per call.
  * ``cache_kv=True`` (cross-attention in cached decoding): the keys/values of
    the encoder outputs are projected once, by the cache-initialising call,
    into ``cached_cross_key`` / ``cached_cross_value`` ``[B, S, H, D_h]``;
    later calls reuse them and ignore ``inputs_kv``. The query batch may be
    ``B * G`` (G beams or samples per example, example-major as
    `decoding.flat_batch_beam_expand` lays them out): the G rows of an
    example are attended as G query positions against that example's keys,
    so the keys are never copied per beam.

  Attributes:
    num_heads: H.
    head_dim: D_h (T5 does not require H * D_h == d_model).
    dropout_rate: dropout on the attention weights.
    dtype: activation dtype.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  def _projection(self, name: str, init: Initializer = default_kernel_init) -> nn.Module:
    return DenseGeneral((self.num_heads, self.head_dim), kernel_axes=("embed", "heads", "kv"),
                        dtype=self.dtype, kernel_init=init, name=name)

  def _key_value(self, inputs_kv: Array) -> Tuple[Array, Array]:
    """inputs_kv [B, K, E] -> keys, values [B, K, H, D_h]."""
    k = nn.with_logical_constraint(self._projection("key")(inputs_kv),
                                   ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(self._projection("value")(inputs_kv),
                                   ("batch", "length", "heads", "kv"))
    return k, v

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array], mask: Optional[Array] = None,
               bias: Optional[Array] = None, *, enable_dropout: bool = True,
               decode: bool = False, cache_kv: bool = False) -> Array:
    """Attends from inputs_q [B, Q, E] to inputs_kv [B, K, E]; returns [B, Q, E].

    Args:
      inputs_q: queries [B, Q, E] ([B * G, 1, E] in cached cross-attention).
      inputs_kv: keys/values source [B, K, E]; unused (may be None) once
        ``cache_kv`` has filled the cache.
      mask: [B, 1, Q, K] 1 = attend, or None. With ``cache_kv`` a per-example
        ``[B, 1, 1, K]`` mask serves all G rows of the example.
      bias: additive bias broadcastable to [B, H, Q, K] (relative positions);
        with ``decode`` it is the full [1, H, L_max, L_max] table and the row of
        the current position is sliced out here.
      enable_dropout: apply attention-weight dropout (needs a 'dropout' rng).
      decode: self-attention decoding: append to ``cached_key/value``.
      cache_kv: cross-attention decoding: keys/values from
        ``cached_cross_key/value`` (created on the first call).
    """
    if decode and cache_kv:
      raise ValueError(f"{self.name}: `decode` (self-attention cache) and `cache_kv` "
                       "(cross-attention cache) are exclusive.")

    def query_init(*args):
      # Folds T5's missing 1/sqrt(head_dim) logit scaling into the initial weights.
      return default_kernel_init(*args) / math.sqrt(self.head_dim)

    q = self._projection("query", query_init)(inputs_q)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    rows, q_len = q.shape[:2]
    groups = 1

    if cache_kv:
      if self.has_variable("cache", "cached_cross_key"):
        k = self.get_variable("cache", "cached_cross_key")
        v = self.get_variable("cache", "cached_cross_value")
        batch = k.shape[0]
        if rows != batch:
          if q_len != 1 or rows % batch:
            raise ValueError(
                f"{self.name}: cached cross-attention for batch {batch} got queries of shape "
                f"{q.shape[:2]} (rows, length); rows must be batch * beams with length 1.")
          groups = rows // batch
          # The G beam rows of each example become its G query positions.
          q = q.reshape(batch, groups, self.num_heads, self.head_dim)
          if mask is not None and mask.shape[0] == rows:  # per-row mask
            mask = mask.reshape(batch, groups, mask.shape[-1])[:, None]
        elif mask is not None and mask.shape[0] != batch:
          # Keys already copied per beam (e.g. by a T5X decoder that knows
          # nothing of shared leaves) with a per-example mask.
          mask = jnp.repeat(mask, batch // mask.shape[0], axis=0)
      else:
        k, v = self._key_value(inputs_kv)
        self.put_variable("cache", "cached_cross_key", k)
        self.put_variable("cache", "cached_cross_value", v)
    else:
      k, v = self._key_value(inputs_kv)

    if decode:
      # The first decode=True pass (with full-length inputs) only creates the
      # zeroed cache; later passes write one position each.
      is_initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        batch, max_length, num_heads, head_dim = cached_key.value.shape
        if q_len != 1 or k.shape[0] != batch:
          raise ValueError(
              f"Cached decoding takes one position per call for batch {batch}; got query "
              f"shape {q.shape[:2]} (batch, length).")
        cur = cache_index.value
        k = lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype),
                                     (0, cur, 0, 0))
        v = lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype),
                                     (0, cur, 0, 0))
        cached_key.value, cached_value.value = k, v
        cache_index.value = cur + 1
        # Only positions already written may be attended to.
        written_1x1x1xL = (jnp.arange(max_length) <= cur)[None, None, None, :]
        mask = combine_masks(mask, jnp.broadcast_to(written_1x1x1xL, (batch, 1, 1, max_length)))
        if bias is not None:
          bias = lax.dynamic_slice_in_dim(bias, cur, 1, axis=-2)

    attention_bias = None
    if mask is not None:
      attention_bias = jnp.where(mask > 0, 0.0, _NEG_INF).astype(jnp.float32)
    attention_bias = combine_biases(attention_bias, bias)

    dropout_rng = None
    deterministic = not enable_dropout or self.dropout_rate == 0.0
    if not deterministic:
      dropout_rng = self.make_rng("dropout")
    x = dot_product_attention(q, k, v, attention_bias, dropout_rng, self.dropout_rate,
                              deterministic, self.dtype)
    if groups > 1:
      x = x.reshape(rows, q_len, self.num_heads, self.head_dim)
    out = DenseGeneral(inputs_q.shape[-1], axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                       dtype=self.dtype, name="out")(x)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))
