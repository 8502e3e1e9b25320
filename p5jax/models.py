"""`EncoderDecoderModel`: the T5X model API around `network.Transformer`.

The model object is stateless: it holds the flax module, the vocabularies,
loss options and the decoding function, and every method is a pure function
of ``(params, batch)`` that callers jit/partition (see `trainer.py`). Names and
contracts follow T5X's ``t5x/models.py`` so T5X users feel at home:

* `get_initial_variables(rng, input_shapes)` -> flax variables whose params are
  boxed with logical axis names (``nn.Partitioned``) for `partitioning.py`.
* `loss_fn(params, batch, dropout_rng)` -> (loss, metrics): token cross-entropy
  weighted by ``decoder_loss_weights`` (+ z-loss, label smoothing).
* `score_batch(params, batch)` -> [B] log-likelihood of the targets; P5 ranks
  candidate items and yes/no answers with it.
* `predict_batch_with_aux(params, batch, rng, decoder_params)` -> decodes with
  a pluggable ``decode_fn`` (default `p5jax.decoding.beam_search`); decoding
  options such as the item-trie ``constraint`` travel in ``decoder_params``.

Batches use the feature names of ``seqio.EncDecFeatureConverter``
(``encoder_input_tokens [B, S]``, ``decoder_input_tokens [B, L]``,
``decoder_target_tokens [B, L]``, ``decoder_loss_weights [B, L]``, the packing
features ``*_segment_ids`` / ``*_positions``) plus P5's
``encoder_whole_word_ids [B, S]``.
"""
import functools
import importlib
from typing import Any, Callable, Mapping, MutableMapping, Optional, Tuple, Type, Union

import clu.metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import seqio

from p5jax import losses

Array = jax.Array
Batch = Mapping[str, Array]
PyTree = Any
MetricsMap = MutableMapping[str, Any]
DecodeFn = Callable[..., Tuple[Array, Array]]

# Optional packing / P5 features forwarded to the network when present.
_ENCODER_EXTRA_FEATURES = ("encoder_segment_ids", "encoder_positions", "encoder_whole_word_ids")
_DECODER_EXTRA_FEATURES = ("decoder_segment_ids", "decoder_positions")


def _default_decode_fn() -> DecodeFn:
  # Imported on first use so this module does not depend on decoding.py at
  # import time (decoding and models are built independently).
  return importlib.import_module("p5jax.decoding").beam_search


class EncoderDecoderModel:
  """T5X-style wrapper of an encoder-decoder module (`network.Transformer`).

  Attributes:
    module: the flax module (``__call__``/``encode``/``decode`` as in T5X).
    input_vocabulary / output_vocabulary: seqio vocabularies.
    optimizer_def: optimizer used by the trainer (opaque here).
    FEATURE_CONVERTER_CLS: default feature converter class.
  """
  FEATURE_CONVERTER_CLS: Type[seqio.FeatureConverter] = seqio.EncDecFeatureConverter

  def __init__(self,
               module: nn.Module,
               input_vocabulary: seqio.Vocabulary,
               output_vocabulary: seqio.Vocabulary,
               optimizer_def: Any = None,
               decode_fn: Optional[DecodeFn] = None,
               feature_converter_cls: Optional[Type[seqio.FeatureConverter]] = None,
               label_smoothing: float = 0.0,
               z_loss: float = 0.0,
               loss_normalizing_factor: losses.LossNormalizingFactor = None):
    """Builds the model.

    Args:
      module: `network.Transformer`.
      input_vocabulary: vocabulary of the encoder inputs.
      output_vocabulary: vocabulary of the targets (its ``eos_id`` ends decoding).
      optimizer_def: optimizer for the trainer (optax transformation or T5X-like
        definition); not used by the model itself.
      decode_fn: decoding function with T5X's ``beam_search`` signature; None =
        `p5jax.decoding.beam_search`, resolved at call time.
      feature_converter_cls: None = ``FEATURE_CONVERTER_CLS``.
      label_smoothing: label smoothing mass for `loss_fn`.
      z_loss: z-loss coefficient for `loss_fn`.
      loss_normalizing_factor: None (sum), a constant, or a
        `losses.SpecialLossNormalizingFactor` (or its name), see `losses`.
    """
    self.module = module
    self._input_vocabulary = input_vocabulary
    self._output_vocabulary = output_vocabulary
    self.optimizer_def = optimizer_def
    self._decode_fn_arg = decode_fn
    if feature_converter_cls is not None:
      self.FEATURE_CONVERTER_CLS = feature_converter_cls  # pylint: disable=invalid-name
    self._label_smoothing = label_smoothing
    self._z_loss = z_loss
    # Validate eagerly: a typo in gin should fail at construction, not in jit.
    losses.get_loss_normalizing_factor_and_weights(
        loss_normalizing_factor, {"decoder_target_tokens": jnp.zeros((1, 1), jnp.int32)})
    self._loss_normalizing_factor = loss_normalizing_factor

  # -------------------------------------------------------------- properties

  @property
  def input_vocabulary(self) -> seqio.Vocabulary:
    return self._input_vocabulary

  @property
  def output_vocabulary(self) -> seqio.Vocabulary:
    return self._output_vocabulary

  @property
  def _decode_fn(self) -> DecodeFn:
    return self._decode_fn_arg if self._decode_fn_arg is not None else _default_decode_fn()

  # ------------------------------------------------------------------ init

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Tuple[int, ...]],
                            input_types: Optional[Mapping[str, Any]] = None) -> PyTree:
    """Initialises the module's variables.

    Args:
      rng: PRNG key.
      input_shapes: feature name -> shape; needs ``encoder_input_tokens``
        [B, S] and ``decoder_input_tokens`` [B, L]; packing / whole-word
        features are used when present.
      input_types: feature name -> dtype (default int32).

    Returns:
      Variables ``{'params': ...}`` with every param boxed in
      ``nn.Partitioned`` (logical axis names), as T5X returns them.
    """
    input_types = dict(input_types or {})
    for required in ("encoder_input_tokens", "decoder_input_tokens"):
      if required not in input_shapes:
        raise ValueError(f"get_initial_variables: input_shapes lacks {required!r} "
                         f"(got {sorted(input_shapes)}).")

    def ones(name):
      if name not in input_shapes:
        return None
      return jnp.ones(input_shapes[name], input_types.get(name, jnp.int32))

    decoder_tokens = ones("decoder_input_tokens")
    return self.module.init(
        rng, ones("encoder_input_tokens"), decoder_tokens, decoder_tokens,
        encoder_segment_ids=ones("encoder_segment_ids"),
        decoder_segment_ids=ones("decoder_segment_ids"),
        encoder_positions=ones("encoder_positions"),
        decoder_positions=ones("decoder_positions"),
        encoder_whole_word_ids=ones("encoder_whole_word_ids"),
        enable_dropout=False, decode=False)

  # ---------------------------------------------------------------- forward

  def _compute_logits(self, params: PyTree, batch: Batch, dropout_rng: Optional[Array] = None,
                      mutable: Union[bool, Any] = False,
                      other_variables: Optional[PyTree] = None) -> Any:
    """Teacher-forced logits [B, L, V] (float32); dropout iff ``dropout_rng``."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    extras = {k: batch[k] for k in _ENCODER_EXTRA_FEATURES + _DECODER_EXTRA_FEATURES
              if batch.get(k) is not None}
    return self.module.apply(
        {"params": params, **(other_variables or {})},
        batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], **extras,
        enable_dropout=rngs is not None, decode=False, rngs=rngs, mutable=mutable)

  def loss_fn(self, params: PyTree, batch: Batch,
              dropout_rng: Optional[Array]) -> Tuple[Array, MetricsMap]:
    """Weighted token cross-entropy (T5X `EncoderDecoderModel.loss_fn`).

    Args:
      params: model parameters.
      batch: features as in the module docstring; padding is excluded through
        ``decoder_loss_weights`` (or ``decoder_target_tokens > 0``).
      dropout_rng: PRNG key for dropout, or None for a deterministic pass.

    Returns:
      (scalar loss, metrics: name -> ``clu.metrics.Metric``).
    """
    logits = self._compute_logits(params, batch, dropout_rng)
    factor, weights = losses.get_loss_normalizing_factor_and_weights(
        self._loss_normalizing_factor, batch)
    targets = batch["decoder_target_tokens"]
    loss, z_loss, _ = losses.compute_weighted_cross_entropy(
        logits, targets, weights, label_smoothing=self._label_smoothing, z_loss=self._z_loss,
        loss_normalizing_factor=factor)
    return loss, self._compute_metrics(logits, targets, weights, loss, z_loss)

  def eval_fn(self, params: PyTree, batch: Batch) -> Tuple[Array, MetricsMap]:
    """`loss_fn` without dropout."""
    return self.loss_fn(params, batch, dropout_rng=None)

  @staticmethod
  def _compute_metrics(logits: Array, targets: Array, weights: Array, loss: Array,
                       z_loss: Array) -> MetricsMap:
    """T5X's base metrics as mergeable clu metrics (jit-friendly pytrees)."""
    nonpadding = jnp.sum(weights)
    per_step = lambda x: clu_metrics.Average(total=jnp.asarray(x, jnp.float32),
                                             count=jnp.array(1.0, jnp.float32))
    return {
        "accuracy": clu_metrics.Accuracy.from_model_output(
            logits=logits, labels=targets.astype(jnp.int32), mask=weights > 0),
        "loss": per_step(loss),
        "z_loss": per_step(z_loss),
        "cross_ent_loss": per_step(loss - z_loss),
        "loss_per_nonpadding_target_token": clu_metrics.Average(
            total=loss, count=nonpadding),
        "loss_per_all_target_tokens": clu_metrics.Average(
            total=loss, count=jnp.array(float(targets.size), jnp.float32)),
        "nonpadding_fraction": clu_metrics.Average(
            total=nonpadding / targets.size, count=jnp.array(1.0, jnp.float32)),
    }

  def score_batch(self, params: PyTree, batch: Batch,
                  return_intermediates: bool = False) -> Union[Array, Tuple[Array, Mapping]]:
    """Log-likelihood of each example's targets under teacher forcing.

    ``score[b] = sum_l w[b, l] * log p(target[b, l] | inputs[b], target[b, :l])``
    with ``w = decoder_loss_weights`` (or ``decoder_target_tokens > 0``).

    Args:
      params: model parameters.
      batch: features as in the module docstring.
      return_intermediates: also return ``{'token_scores': [B, L]}``.

    Returns:
      scores [B] float32 (and the intermediates when asked).
    """
    logits_BxLxV = self._compute_logits(params, batch)
    targets_BxL = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = targets_BxL > 0
    log_probs = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    token_scores_BxL = jnp.take_along_axis(
        log_probs, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    token_scores_BxL = token_scores_BxL * jnp.asarray(weights, jnp.float32)
    scores_B = jnp.sum(token_scores_BxL, axis=-1)
    if return_intermediates:
      return scores_B, {"token_scores": token_scores_BxL}
    return scores_B

  # --------------------------------------------------------------- decoding

  def _compute_logits_from_slice(self, decoding_state: Any, params: PyTree,
                                 encoder_input_tokens: Array,
                                 max_decode_length: int) -> Tuple[Array, PyTree]:
    """One cached decoder step: state.cur_token [N, 1] -> (logits [N, V], cache).

    ``N = B * num_decodes`` rows, example-major. ``encoder_input_tokens`` is
    the per-example [B, S] (only its padding mask is used): the encoder
    keys/values come from the cache, shared by each example's rows.
    """
    tokens_Nx1 = decoding_state.cur_token
    logits_Nx1xV, new_vars = self.module.apply(
        {"params": params, "cache": decoding_state.cache},
        None, encoder_input_tokens, tokens_Nx1, tokens_Nx1,
        enable_dropout=False, decode=True, max_decode_length=max_decode_length,
        mutable=["cache"], method="decode")
    return jnp.squeeze(logits_Nx1xV, axis=1), new_vars["cache"]

  def _init_cache(self, params: PyTree, encoded_BxSxD: Array, encoder_input_tokens: Array,
                  decoder_shape: Tuple[int, int]) -> PyTree:
    """Decoding cache for [B, L] targets (leaves lead with B).

    One ``decode=True`` pass with full-length dummy targets (T5X's cache
    initialisation): self-attention keys/values start at zero with
    ``cache_index`` 0; each cross-attention stores the keys/values it
    projects from ``encoded_BxSxD``, so decode steps never recompute them.
    The pass's logits are unused (under jit XLA drops that work).
    """
    dummy = jnp.ones(decoder_shape, jnp.int32)
    _, variables = self.module.apply(
        {"params": params}, encoded_BxSxD, encoder_input_tokens, dummy, dummy,
        enable_dropout=False, decode=True, max_decode_length=decoder_shape[1],
        mutable=["cache"], method="decode")
    return variables["cache"]

  def predict_batch_with_aux(self, params: PyTree, batch: Batch, rng: Optional[Array] = None,
                             decoder_params: Optional[MutableMapping[str, Any]] = None,
                             return_all_decodes: bool = False, num_decodes: int = 1,
                             prompt_with_targets: bool = False) -> Tuple[Array, Mapping]:
    """Decodes the batch with ``self._decode_fn`` (T5X contract).

    Encodes the inputs once, builds the batch-sized cache (zeroed
    self-attention keys/values, which the decode function expands per beam as
    T5X's do, and the cross-attention keys/values projected once from the
    encodings, which every beam of an example shares), and calls
    ``decode_fn(inputs=, cache=, tokens_to_logits=, eos_id=, num_decodes=,
    decode_rng=, cache_offset=, **decoder_params)``. ``tokens_to_logits``
    accepts ``B * k`` rows for any k (example-major).

    Args:
      params: model parameters.
      batch: needs ``encoder_input_tokens`` [B, S] and ``decoder_input_tokens``
        [B, L] (L = maximum decode length); ``encoder_whole_word_ids`` is used
        when present.
      rng: PRNG key for sampling decoders (becomes ``decode_rng``).
      decoder_params: extra keyword arguments of the decode function, e.g.
        ``{'alpha': 0.6, 'constraint': trie}``; may override ``eos_id``.
      return_all_decodes: return all ``num_decodes`` sequences, not the best.
      num_decodes: beams / samples per example.
      prompt_with_targets: force ``decoder_input_tokens`` (minus EOS) as a
        prefix of the decodes.

    Returns:
      (decodes [B, L] or [B, num_decodes, L], {'scores': [B] or
      [B, num_decodes]}); all-decodes outputs are sorted ascending by score.
    """
    decoder_params = dict(decoder_params or {})
    if rng is not None:
      if decoder_params.get("decode_rng") is not None:
        raise ValueError("Got both `rng` and decoder_params['decode_rng']; pass one.")
      decoder_params["decode_rng"] = rng
    decoder_params.setdefault("eos_id", self.output_vocabulary.eos_id)

    inputs_BxS = batch["encoder_input_tokens"]
    decoder_shape = batch["decoder_input_tokens"].shape
    encoded_BxSxD = self.module.apply(
        {"params": params}, inputs_BxS, batch.get("encoder_segment_ids"),
        batch.get("encoder_positions"), batch.get("encoder_whole_word_ids"),
        enable_dropout=False, method="encode")
    # Batch-sized: the decode function expands the self-attention cache per
    # beam; the cross-attention keys/values stay per example.
    cache = self._init_cache(params, encoded_BxSxD, inputs_BxS, decoder_shape)
    tokens_to_logits = functools.partial(
        self._compute_logits_from_slice, params=params, encoder_input_tokens=inputs_BxS,
        max_decode_length=decoder_shape[1])

    if prompt_with_targets:
      prompt = batch["decoder_input_tokens"]
      # Without EOS, so the prompt does not end decoding early.
      prompt = prompt * (prompt != self.output_vocabulary.eos_id)
    else:
      prompt = jnp.zeros(decoder_shape, jnp.int32)

    decodes, scores = self._decode_fn(
        inputs=prompt, cache=cache, tokens_to_logits=tokens_to_logits,
        num_decodes=num_decodes, cache_offset=0, **decoder_params)
    if return_all_decodes:
      return decodes, {"scores": scores}
    return decodes[:, -1, :], {"scores": scores[:, -1]}

  def predict_batch(self, params: PyTree, batch: Batch, rng: Optional[Array] = None,
                    **kwargs) -> Array:
    """`predict_batch_with_aux` without the aux output."""
    return self.predict_batch_with_aux(params, batch, rng=rng, **kwargs)[0]
