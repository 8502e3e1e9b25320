"""Tests of p5jax.layers / p5jax.network: axes, KV cache, packing, whole words, dtypes.

Compiling is the expensive part on CPU, so most tests share one tiny config,
one batch shape and memoised jitted functions; params come from
`jax.eval_shape` + numpy instead of a compiled `init`.
"""
import dataclasses
import functools

import flax
from flax.core import meta
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p5jax import layers
from p5jax import network

LOGICAL_AXES = {"batch", "length", "vocab", "embed", "mlp", "heads", "kv", "joined_kv",
                "relpos_buckets", "layers", None}
ENC_LEN, DEC_LEN = 8, 6


def tiny_config(**overrides):
  fields = dict(vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=24,
                num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0,
                relative_attention_num_buckets=8, relative_attention_max_distance=16)
  fields.update(overrides)
  return network.T5Config(**fields)


def abstract_variables(cfg):
  """Shapes (and logical axes) of the variables, without compiling init."""
  tokens = jnp.ones((2, 3), jnp.int32)
  init = functools.partial(network.Transformer(cfg).init, enable_dropout=False)
  return jax.eval_shape(init, jax.random.PRNGKey(0), tokens, tokens, tokens)


def random_params(cfg, seed=0):
  """Unboxed float32 params with random values (compiling init is slow on CPU)."""
  rng = np.random.RandomState(seed)
  shapes = meta.unbox(abstract_variables(cfg)["params"])
  return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


@functools.lru_cache(maxsize=None)
def _jitted(cfg, method, static):
  kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in static}
  return jax.jit(functools.partial(network.Transformer(cfg).apply, method=method, **kwargs))


def jitted_apply(cfg, method="__call__", **static):
  """jit(Transformer(cfg).apply) with keyword options fixed; memoised."""
  static = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in static.items()))
  return _jitted(cfg, method, static)


def random_batch(seed=0, vocab=40):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, vocab, (2, ENC_LEN))
  enc[0, ENC_LEN - 3:] = 0  # padding in one example
  tgt = rng.randint(2, vocab, (2, DEC_LEN))
  dec_in = np.concatenate([np.zeros((2, 1), np.int64), tgt[:, :-1]], axis=1)
  return jnp.asarray(enc), jnp.asarray(dec_in), jnp.asarray(tgt)


@pytest.fixture(scope="module")
def v11():
  """A v1.1-style config (gated-gelu, untied) with whole words, and params."""
  cfg = tiny_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    whole_word_vocab_size=4, dropout_rate=0.2)
  return cfg, random_params(cfg, seed=0)


def forward(cfg, params, *args, **kwargs):
  return jitted_apply(cfg, enable_dropout=False)({"params": params}, *args, **kwargs)


def test_relative_position_bucket_matches_t5_reference():
  # Hand-computed with HF's _relative_position_bucket(num_buckets=8, max_distance=16).
  rel = np.array([-20, -9, -5, -4, -3, -1, 0, 1, 3, 4, 7, 8, 15, 16, 40])
  bidir = layers.relative_position_bucket(rel, True, 8, 16)
  causal = layers.relative_position_bucket(rel, False, 8, 16)
  np.testing.assert_array_equal(bidir, [3, 3, 2, 2, 2, 1, 0, 5, 6, 6, 7, 7, 7, 7, 7])
  np.testing.assert_array_equal(causal, [7, 6, 4, 4, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("proj,tie", [("relu", True), ("gated-gelu", False)])
def test_params_have_logical_axes_and_expected_tree(proj, tie):
  cfg = tiny_config(feed_forward_proj=proj, tie_word_embeddings=tie, whole_word_vocab_size=5)
  flat = flax.traverse_util.flatten_dict(abstract_variables(cfg)["params"], sep="/")
  for name, boxed in flat.items():
    assert isinstance(boxed, meta.Partitioned), name
    assert len(boxed.names) == boxed.value.ndim, name
    assert set(boxed.names) <= LOGICAL_AXES, (name, boxed.names)
    assert boxed.value.dtype == jnp.float32, name
  assert ("decoder/logits_dense/kernel" in flat) == (not tie)
  mlp = {"wi"} if proj == "relu" else {"wi_0", "wi_1"}
  assert {k.split("/")[3] for k in flat if k.startswith("encoder/layers_0/mlp/")} == mlp | {"wo"}
  assert flat["encoder/layers_0/attention/query/kernel"].names == ("embed", "heads", "kv")
  assert flat["encoder/layers_0/attention/query/kernel"].value.shape == (16, 2, 8)
  assert flat["encoder/layers_0/attention/out/kernel"].names == ("heads", "kv", "embed")
  assert flat["encoder/relpos_bias/rel_embedding"].value.shape == (2, 8)
  assert flat["whole_word_embedder/embedding"].value.shape == (5, 16)
  # One bias table per stack, shared by its layers (HF: layer 0's table reused).
  assert sorted(k for k in flat if "rel_embedding" in k) == [
      "decoder/relpos_bias/rel_embedding", "encoder/relpos_bias/rel_embedding"]


def test_cached_decoding_equals_teacher_forcing(v11):
  cfg, params = v11
  enc, dec_in, tgt = random_batch(seed=1)
  ww = jnp.asarray([[1, 1, 2, 2, 3, 0, 0, 0], [1, 2, 2, 3, 3, 3, 3, 0]])
  full = forward(cfg, params, enc, dec_in, tgt, encoder_whole_word_ids=ww)

  encoded = jitted_apply(cfg, "encode", enable_dropout=False)(
      {"params": params}, enc, encoder_whole_word_ids=ww)
  step = jitted_apply(cfg, "decode", decode=True, max_decode_length=DEC_LEN,
                      enable_dropout=False, mutable=["cache"])
  # The first decode=True call (full-length targets) initialises the cache.
  _, cache_vars = step({"params": params}, encoded, enc, dec_in, tgt)
  cache = cache_vars["cache"]
  cached = cache["decoder"]["layers_0"]["self_attention"]
  assert cached["cached_key"].shape == (2, DEC_LEN, 2, 8)  # [B, L_max, H, D_h]
  assert int(cached["cache_index"]) == 0
  cross = cache["decoder"]["layers_0"]["encoder_decoder_attention"]
  assert cross["cached_cross_key"].shape == (2, ENC_LEN, 2, 8)  # [B, S, H, D_h]
  cross_key = jnp.einsum("bse,ehd->bshd", encoded,
                         params["decoder"]["layers_0"]["encoder_decoder_attention"]["key"]["kernel"])
  np.testing.assert_allclose(cross["cached_cross_key"], cross_key, rtol=1e-5, atol=1e-5)

  # Beam layout: 3 rows per example [e0, e0, e0, e1, e1, e1] against the
  # per-example cross keys/values (not copied); only self-attention is per row.
  beams = 3
  per_row = lambda x: jnp.repeat(x, beams, axis=0)
  beam_cache = jax.tree_util.tree_map_with_path(
      lambda path, x: x if "cross" in str(path[-1]) or x.ndim == 0 else per_row(x), cache)
  # A decoder unaware of shared leaves may copy them per row too.
  copied_cache = jax.tree.map(lambda x: x if x.ndim == 0 else per_row(x), cache)
  steps, beam_steps = [], []
  for i in range(DEC_LEN):
    # Steps pass no encodings: the cross keys/values come from the cache.
    logits, new_vars = step({"params": params, "cache": cache}, None, enc,
                            dec_in[:, i:i + 1], tgt[:, i:i + 1])
    cache = new_vars["cache"]
    steps.append(logits[:, 0])
    logits, new_vars = step({"params": params, "cache": beam_cache}, None, enc,
                            per_row(dec_in[:, i:i + 1]), per_row(tgt[:, i:i + 1]))
    beam_cache = new_vars["cache"]
    beam_steps.append(logits[:, 0])
    copied_logits, new_vars = step({"params": params, "cache": copied_cache}, None, enc,
                                   per_row(dec_in[:, i:i + 1]), per_row(tgt[:, i:i + 1]))
    copied_cache = new_vars["cache"]
    np.testing.assert_allclose(copied_logits, logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.stack(steps, axis=1), full, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.stack(beam_steps, axis=1), per_row(full), atol=1e-4, rtol=1e-5)
  assert int(cache["decoder"]["layers_1"]["self_attention"]["cache_index"]) == DEC_LEN
  assert beam_cache["decoder"]["layers_1"]["encoder_decoder_attention"][
      "cached_cross_value"].shape == (2, ENC_LEN, 2, 8)


def test_packed_examples_equal_separate_examples(v11):
  cfg, params = v11
  a_in, a_tgt = [5, 6, 7, 1], [3, 4, 1]
  b_in, b_tgt = [8, 9, 1], [2, 1]
  packed_in = jnp.asarray([a_in + b_in + [0], a_in + b_in + [0]])
  packed_dec_in = jnp.asarray([[0, 3, 4, 0, 2, 0]] * 2)
  packed_tgt = jnp.asarray([a_tgt + b_tgt + [0]] * 2)
  packed = forward(cfg, params, packed_in, packed_dec_in, packed_tgt,
                   encoder_segment_ids=jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]] * 2),
                   decoder_segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 0]] * 2),
                   encoder_positions=jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0]] * 2),
                   decoder_positions=jnp.asarray([[0, 1, 2, 0, 1, 0]] * 2))[0]
  separate = forward(cfg, params, jnp.asarray([a_in + [0] * 4, b_in + [0] * 5]),
                     jnp.asarray([[0, 3, 4, 0, 0, 0], [0, 2, 0, 0, 0, 0]]),
                     jnp.asarray([a_tgt + [0] * 3, b_tgt + [0] * 4]))
  # The second segment sits at offsets 4 / 3, but relative positions inside
  # it are unchanged, so it must match example b.
  np.testing.assert_allclose(packed[:3], separate[0, :3], atol=1e-4)
  np.testing.assert_allclose(packed[3:5], separate[1, :2], atol=1e-4)
  # Without segment ids the examples see each other: the check is not vacuous.
  leaky = forward(cfg, params, packed_in, packed_dec_in, packed_tgt)[0]
  assert np.abs(np.asarray(leaky[3:5]) - np.asarray(separate[1, :2])).max() > 1e-3


def test_whole_word_ids_zero_means_no_contribution(v11):
  cfg, params = v11
  enc, _, _ = random_batch(seed=2)
  encode = jitted_apply(cfg, "encode", enable_dropout=False)
  no_words = jnp.zeros_like(enc)
  base = encode({"params": params}, enc, encoder_whole_word_ids=no_words)
  # Changing table row 0 changes nothing: id 0 contributes zero.
  bumped = dict(params)
  bumped["whole_word_embedder"] = {"embedding": params["whole_word_embedder"]["embedding"] + 3.0}
  np.testing.assert_allclose(encode({"params": bumped}, enc, encoder_whole_word_ids=no_words),
                             base, atol=1e-6)
  ww = jnp.asarray([[1, 1, 2, 3, 3, 0, 0, 0], [1, 2, 2, 2, 3, 3, 3, 3]])
  with_words = encode({"params": params}, enc, encoder_whole_word_ids=ww)
  assert np.abs(np.asarray(with_words) - np.asarray(base)).max() > 1e-3


def test_embed_looks_up_rows_and_attends_with_transpose():
  table = np.arange(12, dtype=np.float32).reshape(3, 4)
  emb = layers.Embed(3, 4)
  variables = {"params": {"embedding": table}}
  np.testing.assert_array_equal(emb.apply(variables, jnp.asarray([[0, 2, 1]]))[0],
                                table[[0, 2, 1]])
  x = np.ones((1, 1, 4), np.float32)
  np.testing.assert_array_equal(emb.apply(variables, x, method="attend")[0, 0], table.sum(1))


def test_dropout_only_when_enabled(v11):
  cfg, params = v11
  enc, dec_in, tgt = random_batch(seed=4)
  train = jitted_apply(cfg, enable_dropout=True)
  key = lambda seed: jax.random.key(seed, impl="rbg")  # cheap to compile on CPU
  a = train({"params": params}, enc, dec_in, tgt, rngs={"dropout": key(0)})
  b = train({"params": params}, enc, dec_in, tgt, rngs={"dropout": key(1)})
  off = forward(cfg, params, enc, dec_in, tgt)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  assert np.abs(np.asarray(a) - np.asarray(off)).max() > 1e-3
  np.testing.assert_array_equal(forward(cfg, params, enc, dec_in, tgt), off)


def test_bfloat16_activations_keep_float32_params(v11):
  cfg, params = v11
  cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
  enc, dec_in, tgt = random_batch(seed=5)
  out16 = forward(cfg16, params, enc, dec_in, tgt)
  out32 = forward(cfg, params, enc, dec_in, tgt)
  assert out16.dtype == jnp.float32  # logits are returned in float32
  err = np.abs(np.asarray(out16) - np.asarray(out32))
  assert err.max() > 0  # really ran in bfloat16
  assert err.mean() < 0.05 * np.abs(np.asarray(out32)).mean()
  abstract = abstract_variables(cfg16)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(meta.unbox(abstract)))


@pytest.mark.parametrize("field,value", [("feed_forward_proj", "swiglu"), ("d_model", 0),
                                         ("dtype", "float16"), ("dropout_rate", 1.0),
                                         ("whole_word_vocab_size", -1)])
def test_bad_config_fields_are_named(field, value):
  with pytest.raises(network.ConfigError, match=field):
    tiny_config(**{field: value})


def test_v10_v11_defaults():
  assert tiny_config().scale_decoder_outputs  # tied -> scaled (v1.0)
  assert not tiny_config(tie_word_embeddings=False).scale_decoder_outputs  # v1.1
  assert tiny_config(feed_forward_proj="gated-gelu").mlp_activations == ("gelu", "linear")


def test_decode_rejects_packing(v11):
  cfg, params = v11
  enc, dec_in, tgt = random_batch()
  with pytest.raises(ValueError, match="Packed"):
    jax.eval_shape(functools.partial(
        network.Transformer(cfg).apply, decode=True, enable_dropout=False, mutable=["cache"]),
        {"params": params}, enc, dec_in, tgt, encoder_segment_ids=jnp.ones_like(enc),
        decoder_segment_ids=jnp.ones_like(tgt))
