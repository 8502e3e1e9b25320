"""The T5 encoder-decoder network of p5jax (T5 v1.0 and v1.1) in Flax linen.

One frozen `T5Config` describes the architecture (gin configures its fields;
see ``gin/models/*.gin``); `Transformer` is the module `models.EncoderDecoderModel`
wraps, with T5X's ``__call__`` / ``encode`` / ``decode`` signatures.

* v1.0 (``t5-small``/``t5-base``): ReLU MLP, output head tied to the token
  embedding, decoder output scaled by ``d_model**-0.5`` before the head.
* v1.1: gated-GELU MLP, separate (untied) head, no scaling.

P5's *whole-word embedding* (``whole_word_vocab_size > 0``) adds a learned
vector per word index to the encoder token embeddings, so all sub-tokens of
``item_7391`` share one extra embedding; ``encoder_whole_word_ids`` is
``[B, L_enc]`` with 0 = no word (zero contribution).

Packing follows T5X: ``*_segment_ids`` block attention across examples; relative
positions are computed from array positions, which inside one contiguous
packed segment equal differences of ``*_positions`` (those are accepted for
interface compatibility and not needed otherwise).

Parameter tree (``[...]`` = shape, logical axes in parentheses)::

  token_embedder/embedding                    [V, D]   (vocab, embed)
  whole_word_embedder/embedding               [W, D]   (None, embed)    optional
  encoder/relpos_bias/rel_embedding           [H, R]   (heads, relpos_buckets)
  encoder/layers_i/pre_attention_layer_norm/scale
  encoder/layers_i/attention/{query,key,value}/kernel  [D, H, Dh] (embed, heads, kv)
  encoder/layers_i/attention/out/kernel       [H, Dh, D] (heads, kv, embed)
  encoder/layers_i/pre_mlp_layer_norm/scale
  encoder/layers_i/mlp/{wi | wi_0, wi_1}/kernel  [D, F] (embed, mlp)
  encoder/layers_i/mlp/wo/kernel              [F, D]   (mlp, embed)
  encoder/encoder_norm/scale                  [D]      (embed)
  decoder/relpos_bias/rel_embedding
  decoder/layers_i/{pre_self_attention_layer_norm, self_attention,
                    pre_cross_attention_layer_norm, encoder_decoder_attention,
                    pre_mlp_layer_norm, mlp}
  decoder/decoder_norm/scale
  decoder/logits_dense/kernel                 [D, V]   (embed, vocab)  untied only
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from p5jax import layers

Array = jax.Array

FEED_FORWARD_PROJ = {"relu": ("relu",), "gated-gelu": ("gelu", "linear")}


class ConfigError(ValueError):
  """An invalid `T5Config` field."""


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5 encoder-decoder (field names follow HF's T5Config).

  Attributes:
    vocab_size: V, rows of the token embedding (and head outputs).
    d_model: D, width of the residual stream.
    num_heads: H.
    head_dim: D_h per head (HF ``d_kv``).
    d_ff: F, MLP hidden size.
    num_encoder_layers / num_decoder_layers: stack depths.
    dropout_rate: dropout everywhere T5 applies it (embeddings, residual
      branches, MLP hidden, attention weights, stack outputs).
    feed_forward_proj: "relu" (v1.0) or "gated-gelu" (v1.1).
    tie_word_embeddings: the output head reuses the token embedding (v1.0).
    scale_decoder_outputs: multiply decoder outputs by ``d_model**-0.5`` before
      the head (T5X ``logits_via_embedding`` scaling). None = same as
      ``tie_word_embeddings`` (true for v1.0, false for v1.1).
    relative_attention_num_buckets / relative_attention_max_distance: T5
      relative position buckets.
    layer_norm_epsilon: RMS norm epsilon.
    dtype: activation dtype, "float32" or "bfloat16" (params stay float32).
    whole_word_vocab_size: rows of P5's whole-word embedding; 0 disables it.
  """
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  head_dim: int = 64
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dropout_rate: float = 0.1
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  scale_decoder_outputs: Optional[bool] = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  whole_word_vocab_size: int = 0

  def __post_init__(self):
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs", bool(self.tie_word_embeddings))
    if self.feed_forward_proj not in FEED_FORWARD_PROJ:
      raise ConfigError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not "
                        f"supported; use one of {sorted(FEED_FORWARD_PROJ)}.")
    for field in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                  "num_encoder_layers", "num_decoder_layers",
                  "relative_attention_num_buckets", "relative_attention_max_distance"):
      if int(getattr(self, field)) <= 0:
        raise ConfigError(f"T5Config.{field} must be positive, got {getattr(self, field)}.")
    if self.whole_word_vocab_size < 0:
      raise ConfigError("T5Config.whole_word_vocab_size must be >= 0 (0 = off), got "
                        f"{self.whole_word_vocab_size}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}.")
    try:
      dtype = jnp.dtype(self.dtype)
    except TypeError as e:
      raise ConfigError(f"T5Config.dtype={self.dtype!r} is not a dtype.") from e
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise ConfigError(f"T5Config.dtype must be float32 or bfloat16, got {self.dtype!r}.")

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def mlp_activations(self):
    return FEED_FORWARD_PROJ[self.feed_forward_proj]


def _residual_dropout(config: T5Config, x: Array, enable_dropout: bool) -> Array:
  return nn.Dropout(config.dropout_rate)(x, deterministic=not enable_dropout)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention + MLP block of the encoder."""
  config: T5Config

  @nn.compact
  def __call__(self, x_BxLxD: Array, encoder_mask: Optional[Array], bias_1xHxLxL: Array,
               *, enable_dropout: bool = True) -> Array:
    cfg, dtype = self.config, self.config.activation_dtype
    h = layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x_BxLxD)
    h = layers.MultiHeadDotProductAttention(cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dtype,
                                            name="attention")(
        h, h, encoder_mask, bias_1xHxLxL, enable_dropout=enable_dropout)
    x_BxLxD = x_BxLxD + _residual_dropout(cfg, h, enable_dropout)

    h = layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x_BxLxD)
    h = layers.MlpBlock(cfg.d_ff, cfg.mlp_activations, cfg.dropout_rate, dtype, name="mlp")(
        h, enable_dropout=enable_dropout)
    x_BxLxD = x_BxLxD + _residual_dropout(cfg, h, enable_dropout)
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention + cross-attention + MLP block."""
  config: T5Config

  @nn.compact
  def __call__(self, y_BxLxD: Array, encoded_BxSxD: Array, decoder_mask: Optional[Array],
               encoder_decoder_mask: Optional[Array], bias_1xHxLxL: Array,
               *, enable_dropout: bool = True, decode: bool = False) -> Array:
    cfg, dtype = self.config, self.config.activation_dtype

    def attention(name):
      return layers.MultiHeadDotProductAttention(cfg.num_heads, cfg.head_dim, cfg.dropout_rate,
                                                 dtype, name=name)

    h = layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_self_attention_layer_norm")(y_BxLxD)
    h = attention("self_attention")(h, h, decoder_mask, bias_1xHxLxL,
                                    enable_dropout=enable_dropout, decode=decode)
    y_BxLxD = y_BxLxD + _residual_dropout(cfg, h, enable_dropout)

    h = layers.RMSNorm(cfg.layer_norm_epsilon, dtype,
                       name="pre_cross_attention_layer_norm")(y_BxLxD)
    # In cached decoding the encoder keys/values are projected once, by the
    # cache-initialising pass, and shared by all beams of an example.
    h = attention("encoder_decoder_attention")(h, encoded_BxSxD, encoder_decoder_mask, None,
                                               enable_dropout=enable_dropout, cache_kv=decode)
    y_BxLxD = y_BxLxD + _residual_dropout(cfg, h, enable_dropout)

    h = layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(y_BxLxD)
    h = layers.MlpBlock(cfg.d_ff, cfg.mlp_activations, cfg.dropout_rate, dtype, name="mlp")(
        h, enable_dropout=enable_dropout)
    y_BxLxD = y_BxLxD + _residual_dropout(cfg, h, enable_dropout)
    return nn.with_logical_constraint(y_BxLxD, ("batch", "length", "embed"))


class Encoder(nn.Module):
  """Token (+ whole-word) embedding, encoder layers, final RMS norm."""
  config: T5Config
  shared_embedding: nn.Module
  whole_word_embedding: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, encoder_mask: Optional[Array] = None,
               encoder_whole_word_ids: Optional[Array] = None,
               *, enable_dropout: bool = True) -> Array:
    """tokens [B, S] int -> encoded [B, S, D]."""
    cfg = self.config
    x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))
    if self.whole_word_embedding is not None:
      if encoder_whole_word_ids is None:
        # Still call the table so its parameters exist (e.g. at init).
        encoder_whole_word_ids = jnp.zeros_like(encoder_input_tokens)
      ww = encoder_whole_word_ids.astype(jnp.int32)
      x = x + self.whole_word_embedding(ww) * (ww > 0)[..., None].astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = _residual_dropout(cfg, x, enable_dropout)

    length = encoder_input_tokens.shape[-1]
    bias = layers.RelativePositionBiases(cfg.relative_attention_num_buckets,
                                         cfg.relative_attention_max_distance, cfg.num_heads,
                                         cfg.activation_dtype, name="relpos_bias")(
        length, length, bidirectional=True)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, encoder_mask, bias,
                                                 enable_dropout=enable_dropout)
    x = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="encoder_norm")(x)
    return _residual_dropout(cfg, x, enable_dropout)


class Decoder(nn.Module):
  """Decoder layers, final RMS norm and output head (tied or untied)."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded_BxSxD: Array, decoder_input_tokens: Array,
               decoder_mask: Optional[Array] = None, encoder_decoder_mask: Optional[Array] = None,
               *, enable_dropout: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None) -> Array:
    """encoded [B, S, D], decoder tokens [B, L] -> logits [B, L, V] (float32)."""
    cfg, dtype = self.config, self.config.activation_dtype
    y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
    y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
    y = _residual_dropout(cfg, y, enable_dropout)

    # In cached decoding the bias covers the whole cache; attention slices the
    # row of the current position.
    length = decoder_input_tokens.shape[-1]
    if decode and max_decode_length:
      length = max_decode_length
    bias = layers.RelativePositionBiases(cfg.relative_attention_num_buckets,
                                         cfg.relative_attention_max_distance, cfg.num_heads,
                                         dtype, name="relpos_bias")(
        length, length, bidirectional=False)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, name=f"layers_{i}")(
          y, encoded_BxSxD, decoder_mask, encoder_decoder_mask, bias,
          enable_dropout=enable_dropout, decode=decode)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, dtype, name="decoder_norm")(y)
    y = _residual_dropout(cfg, y, enable_dropout)

    if cfg.scale_decoder_outputs:
      y = y * (cfg.d_model ** -0.5)
    if cfg.tie_word_embeddings:
      logits = self.shared_embedding.attend(y)
    else:
      logits = layers.DenseGeneral(cfg.vocab_size, kernel_axes=("embed", "vocab"), dtype=dtype,
                                   name="logits_dense")(y)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


class Transformer(nn.Module):
  """T5 encoder-decoder with T5X's ``__call__`` / ``encode`` / ``decode`` API."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.d_model, cfg.activation_dtype)
    whole_word_embedder = None
    if cfg.whole_word_vocab_size > 0:
      # Small table (a few hundred rows): replicated, so any whole-word vocab
      # size works with any number of model partitions.
      whole_word_embedder = layers.Embed(cfg.whole_word_vocab_size, cfg.d_model,
                                         cfg.activation_dtype, axes=(None, "embed"))
    self.whole_word_embedder = whole_word_embedder
    self.encoder = Encoder(cfg, self.token_embedder, self.whole_word_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             encoder_positions: Optional[Array] = None,
             encoder_whole_word_ids: Optional[Array] = None,
             *, enable_dropout: bool = True) -> Array:
    """Encoder input tokens [B, S] (0 = padding) -> encodings [B, S, D]."""
    del encoder_positions  # Relative positions come from array positions (see module doc).
    dtype = self.config.activation_dtype
    nonpad = encoder_input_tokens > 0
    mask = layers.make_attention_mask(nonpad, nonpad, dtype=dtype)
    if encoder_segment_ids is not None:
      mask = layers.combine_masks(
          mask, layers.make_attention_mask(encoder_segment_ids, encoder_segment_ids, jnp.equal,
                                           dtype), dtype=dtype)
    return self.encoder(encoder_input_tokens, mask, encoder_whole_word_ids,
                        enable_dropout=enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, *, enable_dropout: bool = True,
             decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """Decodes given encodings [B, S, D]; returns logits [B, L, V] (float32).

    Cached decoding (``decode=True``) follows T5X: a first call with the
    full-length decoder inputs creates the cache (zeroed self-attention keys/
    values, and the cross-attention keys/values projected from ``encoded``),
    then each call feeds one position. Steps read the encoder keys/values from
    the cache (``encoded`` is not used again) and may pass ``B * beams``
    decoder rows against per-example ``[B, S]`` encoder tokens: each
    example's beams share its cached keys/values without copies.

    Args:
      encoded: encoder output [B, S, D]; may be None in cached decode steps
        after the cache-initialising call.
      encoder_input_tokens: [B, S], only used for the padding mask.
      decoder_input_tokens: [B, L] (L = 1 per call in cached decoding, where
        the batch may be B * beams, example-major).
      decoder_target_tokens: [B, L], 0 = padding (masks teacher forcing).
      encoder_segment_ids, decoder_segment_ids: packing ids, or None.
      decoder_positions: accepted for T5X compatibility (unused, see module doc).
      enable_dropout: training-mode dropout.
      decode: cached single-step decoding with the ``cache`` collection.
      max_decode_length: cache length L_max when ``decode`` (for the bias).
    """
    del decoder_positions
    dtype = self.config.activation_dtype
    if decode:
      if encoder_segment_ids is not None or decoder_segment_ids is not None:
        raise ValueError("Packed inputs (segment ids) cannot be used with decode=True.")
      decoder_mask = None  # The cache masks unwritten positions.
      # One mask row set per example: [B, 1, L, S]; with B * beams decoder
      # rows and L = 1 the cross-attention shares it across the beams.
      query_BxL = jnp.ones(encoder_input_tokens.shape[:1] + decoder_target_tokens.shape[1:],
                           jnp.int32)
      encoder_decoder_mask = layers.make_attention_mask(
          query_BxL, encoder_input_tokens > 0, dtype=dtype)
    else:
      decoder_mask = layers.make_decoder_mask(decoder_target_tokens, dtype, decoder_segment_ids)
      encoder_decoder_mask = layers.make_attention_mask(
          decoder_target_tokens > 0, encoder_input_tokens > 0, dtype=dtype)
      if encoder_segment_ids is not None:
        if decoder_segment_ids is None:
          raise ValueError("encoder_segment_ids given without decoder_segment_ids.")
        encoder_decoder_mask = layers.combine_masks(
            encoder_decoder_mask,
            layers.make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal, dtype),
            dtype=dtype)
    return self.decoder(encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask,
                        enable_dropout=enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               encoder_whole_word_ids: Optional[Array] = None,
               *, enable_dropout: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None) -> Array:
    """Teacher-forced forward pass: [B, S] inputs, [B, L] targets -> logits [B, L, V]."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          encoder_whole_word_ids, enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length)
