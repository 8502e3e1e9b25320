"""Tests of p5jax.models (EncoderDecoderModel), p5jax.losses and gin/models/*.gin."""
import functools
import os

import flax
from flax.core import meta
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from p5jax import convert
from p5jax import losses
from p5jax import models
from p5jax import network

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, ENC_LEN, DEC_LEN, EOS = 48, 7, 5, 1


@flax.struct.dataclass
class _State:
  """The two fields of T5X's DecodingState that tokens_to_logits reads."""
  cur_token: jax.Array
  cache: dict


def greedy_decode(inputs, cache, tokens_to_logits, eos_id, num_decodes=1, decode_rng=None,
                  cache_offset=0, max_decode_len=None):
  """A tiny T5X-signature greedy decoder (num_decodes=1), for these tests only."""
  del decode_rng, cache_offset, max_decode_len
  assert num_decodes == 1
  batch, length = inputs.shape

  def body(i, carry):
    seqs, cur, cache, score, done = carry
    logits, cache = tokens_to_logits(_State(cur_token=cur, cache=cache))
    log_probs = jax.nn.log_softmax(logits)
    nxt = jnp.where(done, 0, jnp.argmax(logits, axis=-1))
    score = score + jnp.where(done, 0.0, jnp.take_along_axis(log_probs, nxt[:, None], 1)[:, 0])
    return (seqs.at[:, i].set(nxt), nxt[:, None], cache, score, done | (nxt == eos_id))

  init = (jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, 1), jnp.int32), cache,
          jnp.zeros((batch,)), jnp.zeros((batch,), bool))
  seqs, _, _, score, _ = jax.lax.fori_loop(0, length, body, init)
  return seqs[:, None], score[:, None]


def tiny_model(decode_fn=greedy_decode, **kwargs):
  cfg = network.T5Config(vocab_size=VOCAB, d_model=16, num_heads=2, head_dim=8, d_ff=24,
                         num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16,
                         whole_word_vocab_size=6)
  vocabulary = seqio.PassThroughVocabulary(size=VOCAB, eos_id=EOS)
  return models.EncoderDecoderModel(network.Transformer(cfg), vocabulary, vocabulary,
                                    decode_fn=decode_fn, **kwargs)


def input_shapes():
  return {"encoder_input_tokens": (2, ENC_LEN), "decoder_input_tokens": (2, DEC_LEN),
          "encoder_whole_word_ids": (2, ENC_LEN)}


@pytest.fixture(scope="module")
def params():
  """Random params with the model's tree, without compiling init (slow on CPU)."""
  model = tiny_model()
  abstract = jax.eval_shape(functools.partial(model.get_initial_variables,
                                              input_shapes=input_shapes()),
                            jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32),
                      meta.unbox(abstract["params"]))


def make_batch(seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, (2, ENC_LEN)).astype(np.int32)
  enc[1, 5:] = 0
  tgt = rng.randint(2, VOCAB, (2, DEC_LEN)).astype(np.int32)
  tgt[0, 3] = EOS
  tgt[0, 4:] = 0  # padding
  weights = (tgt > 0).astype(np.float32)
  dec_in = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], axis=1)
  ww = np.array([[1, 1, 2, 3, 3, 0, 0], [1, 2, 2, 0, 0, 0, 0]], np.int32)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": weights,
          "encoder_whole_word_ids": ww}


Z_LOSS = 1e-3


@pytest.fixture(scope="module")
def model():
  """One model for the numeric tests, so jitted functions compile once."""
  return tiny_model(z_loss=Z_LOSS)


@pytest.fixture(scope="module")
def jitted(model):
  return {
      "logits": jax.jit(model._compute_logits),  # pylint: disable=protected-access
      "loss": jax.jit(model.loss_fn),
      "score": jax.jit(functools.partial(model.score_batch, return_intermediates=True)),
      "predict": jax.jit(model.predict_batch_with_aux),
  }


def teacher_forced_batch(batch, targets):
  """`batch` with `targets` [B, L] as decoder targets (shifted inputs, weights > 0)."""
  dec_in = np.concatenate([np.zeros((targets.shape[0], 1), np.int32), targets[:, :-1]], 1)
  return dict(batch, decoder_target_tokens=targets, decoder_input_tokens=dec_in,
              decoder_loss_weights=(targets > 0).astype(np.float32))


def test_get_initial_variables_is_boxed_with_logical_axes():
  model = tiny_model()
  variables = jax.eval_shape(functools.partial(model.get_initial_variables,
                                               input_shapes=input_shapes()),
                             jax.random.PRNGKey(0))
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  assert all(isinstance(v, meta.Partitioned) for v in flat.values())
  assert flat["whole_word_embedder/embedding"].value.shape == (6, 16)
  assert flat["token_embedder/embedding"].names == ("vocab", "embed")
  with pytest.raises(ValueError, match="decoder_input_tokens"):
    model.get_initial_variables(jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 2)})


def test_loss_matches_manual_cross_entropy_and_ignores_padding(model, jitted, params):
  batch = make_batch()
  loss, metrics = jitted["loss"](params, batch, None)

  logits = np.asarray(jitted["logits"](params, batch))
  log_z = np.log(np.exp(logits).sum(-1))
  log_p = logits - log_z[..., None]
  tgt, w = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  token_nll = -np.take_along_axis(log_p, tgt[..., None], -1)[..., 0]
  manual = np.sum(w * (token_nll + Z_LOSS * log_z ** 2))
  np.testing.assert_allclose(loss, manual, rtol=1e-5)
  assert float(metrics["z_loss"].compute()) == pytest.approx(
      np.sum(w * Z_LOSS * log_z ** 2), rel=1e-4)
  acc = np.sum((logits.argmax(-1) == tgt) * w) / w.sum()
  assert float(metrics["accuracy"].compute()) == pytest.approx(acc)

  # Weight-0 positions do not count, whatever their target (logits at other
  # positions are unaffected by them: causal mask).
  changed = dict(batch)
  changed["decoder_target_tokens"] = tgt.copy()
  changed["decoder_loss_weights"] = w.copy()
  changed["decoder_loss_weights"][1, 2] = 0.0
  changed["decoder_target_tokens"][1, 2] = (tgt[1, 2] + 5) % VOCAB or 2
  expected = manual - (token_nll[1, 2] + Z_LOSS * log_z[1, 2] ** 2)
  np.testing.assert_allclose(jitted["loss"](params, changed, None)[0], expected, rtol=1e-5)

  # Without decoder_loss_weights, padding (target 0) is ignored too.
  no_weights = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
  _, fallback = losses.get_loss_normalizing_factor_and_weights(None, no_weights)
  np.testing.assert_array_equal(fallback, w)

  # Dropout is on only with a dropout rng.
  dropped = jitted["loss"](params, batch, jax.random.key(0, impl="rbg"))[0]
  assert abs(float(dropped) - float(loss)) > 1e-4


def test_label_smoothing_and_normalizing_factor():
  logits = jnp.asarray([[[2.0, 0.5, -1.0, 0.0]]])
  targets = jnp.asarray([[1]])
  loss, _, wsum = losses.compute_weighted_cross_entropy(
      logits, targets, jnp.ones((1, 1)), label_smoothing=0.3, loss_normalizing_factor=2.0)
  log_p = np.asarray(jax.nn.log_softmax(logits))[0, 0]
  soft = np.full(4, 0.1)
  soft[1] = 0.7
  entropy = -np.sum(soft * np.log(soft))
  np.testing.assert_allclose(loss, (-np.sum(soft * log_p) - entropy) / 2.0, rtol=1e-5)
  assert float(wsum) == 1.0

  batch = {"decoder_target_tokens": jnp.asarray([[5, 6, 0], [7, 0, 0]])}
  factor, w = losses.get_loss_normalizing_factor_and_weights("NUM_REAL_TARGET_TOKENS", batch)
  assert float(factor) == 3.0
  factor, w = losses.get_loss_normalizing_factor_and_weights(
      losses.SpecialLossNormalizingFactor.AVERAGE_PER_SEQUENCE, batch)
  assert factor == 2.0
  np.testing.assert_allclose(w, [[0.5, 0.5, 0], [1, 0, 0]])
  with pytest.raises(ValueError, match="loss_normalizing_factor='tokens'"):
    tiny_model(loss_normalizing_factor="tokens")


def test_score_batch_is_sum_of_weighted_token_log_probs(jitted, params):
  batch = make_batch(seed=1)
  scores, aux = jitted["score"](params, batch)
  log_p = np.asarray(jax.nn.log_softmax(jitted["logits"](params, batch), axis=-1))
  tgt, w = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  token = np.take_along_axis(log_p, tgt[..., None], -1)[..., 0]
  np.testing.assert_allclose(scores, (token * w).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(aux["token_scores"], token * w, rtol=1e-5, atol=1e-6)
  # Weights select the positions that count (e.g. only an answer's tokens).
  only_first = dict(batch, decoder_loss_weights=np.eye(DEC_LEN, dtype=np.float32)[[0, 0]])
  np.testing.assert_allclose(jitted["score"](params, only_first)[0], token[:, 0], rtol=1e-5)


def test_predict_batch_with_aux_equals_stepwise_argmax(model, jitted, params):
  batch = make_batch(seed=2)
  decodes, aux = jitted["predict"](params, batch)
  assert decodes.shape == (2, DEC_LEN) and aux["scores"].shape == (2,)

  # Reference: greedy decoding by repeated full teacher-forced passes.
  dec_in = np.zeros((2, DEC_LEN), np.int32)
  expected = np.zeros((2, DEC_LEN), np.int32)
  done = np.zeros(2, bool)
  for i in range(DEC_LEN):
    logits = jitted["logits"](params, dict(batch, decoder_input_tokens=dec_in,
                                           decoder_target_tokens=np.ones_like(dec_in)))
    nxt = np.where(done, 0, np.asarray(logits[:, i]).argmax(-1))
    expected[:, i] = nxt
    done |= nxt == EOS
    if i + 1 < DEC_LEN:
      dec_in[:, i + 1] = nxt
  np.testing.assert_array_equal(decodes, expected)

  # The decoder's score is the log-likelihood that score_batch assigns.
  scores, _ = jitted["score"](params, teacher_forced_batch(batch, expected))
  np.testing.assert_allclose(aux["scores"], scores, rtol=1e-4, atol=1e-4)

  with pytest.raises(ValueError, match="decode_rng"):
    model.predict_batch_with_aux(params, batch, rng=jax.random.PRNGKey(0),
                                 decoder_params={"decode_rng": jax.random.PRNGKey(1)})


def test_decoder_params_reach_decode_fn(params):
  seen = {}

  def spy(inputs, cache, tokens_to_logits, eos_id, num_decodes, cache_offset, **kwargs):
    self_attention = cache["decoder"]["layers_0"]["self_attention"]
    seen.update(kwargs, eos_id=eos_id, num_decodes=num_decodes, cache_offset=cache_offset,
                index_shape=self_attention["cache_index"].shape,
                key_shape=self_attention["cached_key"].shape)
    del tokens_to_logits
    b, l = inputs.shape
    return jnp.zeros((b, num_decodes, l), jnp.int32), jnp.zeros((b, num_decodes))

  model = tiny_model(decode_fn=spy)
  decodes, aux = jax.jit(functools.partial(
      model.predict_batch_with_aux, decoder_params={"alpha": 0.0, "constraint": "trie"},
      num_decodes=3, return_all_decodes=True))(params, make_batch())
  assert decodes.shape == (2, 3, DEC_LEN) and aux["scores"].shape == (2, 3)
  assert seen["alpha"] == 0.0 and seen["constraint"] == "trie" and seen["eos_id"] == EOS
  assert seen["num_decodes"] == 3 and seen["cache_offset"] == 0
  # The cache is batch-sized: the decode function expands it per beam (T5X).
  assert seen["key_shape"] == (2, DEC_LEN, 2, 8) and seen["index_shape"] == ()


def test_beam_search_integration(jitted, params):
  decoding = pytest.importorskip("p5jax.decoding")
  model = tiny_model(decode_fn=decoding.beam_search, z_loss=Z_LOSS)
  batch = make_batch(seed=3)
  decodes, aux = jax.jit(functools.partial(
      model.predict_batch_with_aux, num_decodes=2, return_all_decodes=True,
      decoder_params={"alpha": 0.0}))(params, batch)
  assert decodes.shape == (2, 2, DEC_LEN)
  assert np.all(np.diff(np.asarray(aux["scores"]), axis=1) >= 0)  # ascending, best last
  # alpha=0: every beam's score is its log-likelihood (each beam's rows use
  # the example's shared cross-attention cache; the first step ran per example).
  # Unconstrained beams may emit token 0 mid-sequence (as T5X's do), which
  # teacher forcing treats as padding: those beams are not comparable.
  checked = 0
  for beam in range(2):
    beam_decodes = np.asarray(decodes[:, beam])
    scores, _ = jitted["score"](params, teacher_forced_batch(batch, beam_decodes))
    for b in range(2):
      ended = np.cumsum(beam_decodes[b] == EOS) > 0
      if np.all((beam_decodes[b] > 0) | ended):
        np.testing.assert_allclose(aux["scores"][b, beam], scores[b], rtol=1e-4, atol=1e-4)
        checked += 1
  assert checked >= 3

  # Greedy sampling, 3 rows per example, equals the best beam's first token
  # path under greedy decoding: all rows agree and score their log-likelihood.
  sampler = tiny_model(decode_fn=decoding.temperature_sample)
  samples, aux = jax.jit(functools.partial(
      sampler.predict_batch_with_aux, num_decodes=3, return_all_decodes=True,
      decoder_params={"temperature": 0.0, "rescale_log_probs": False}))(params, batch)
  np.testing.assert_array_equal(samples[:, 0], samples[:, 2])
  scores, _ = jitted["score"](params, teacher_forced_batch(batch, np.asarray(samples[:, 0])))
  np.testing.assert_allclose(aux["scores"][:, 0], scores, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------- gin


@gin.configurable
def _model_from_gin(model):
  return model


def parse_model_gin(size, *bindings):
  gin.clear_config()
  gin.parse_config_files_and_bindings(
      [os.path.join(REPO_ROOT, "gin", "models", f"{size}.gin")],
      ["from __gin__ import dynamic_registration", "import seqio",
       "DATASET = 'unused'", "VOCABULARY = @seqio.PassThroughVocabulary()",
       "seqio.PassThroughVocabulary.size = 32100", "seqio.PassThroughVocabulary.eos_id = 1",
       *bindings], finalize_config=False)
  gin.parse_config("_model_from_gin.model = %MODEL")
  gin.finalize()
  try:
    return _model_from_gin()
  finally:
    gin.clear_config()


@pytest.fixture
def repo_cwd(monkeypatch):
  monkeypatch.chdir(REPO_ROOT)  # `include 'gin/models/...'` is relative to the repo


@pytest.mark.parametrize("size,layers,d_model,heads,d_ff,num_params", [
    ("small", 6, 512, 8, 2048, 60_506_624),   # t5-small
    ("base", 12, 768, 12, 3072, 222_903_552),  # t5-base
])
def test_size_gin_files_match_t5_checkpoints(repo_cwd, size, layers, d_model, heads, d_ff,
                                              num_params):
  model = parse_model_gin(size, "WHOLE_WORD_VOCAB_SIZE = 0")
  cfg = model.module.config
  assert isinstance(model, models.EncoderDecoderModel)
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.d_model, cfg.num_heads,
          cfg.head_dim, cfg.d_ff) == (layers, layers, d_model, heads, 64, d_ff)
  assert cfg.vocab_size == 32128  # 32100 rounded up to 128, as T5
  assert cfg.feed_forward_proj == "relu" and cfg.tie_word_embeddings
  shapes = convert.expected_param_shapes(cfg)
  assert sum(int(np.prod(s)) for s in shapes.values()) == num_params


def test_tiny_gin_and_overrides(repo_cwd):
  model = parse_model_gin("tiny", "DROPOUT_RATE = 0.0", "ACTIVATION_DTYPE = 'bfloat16'",
                          "Z_LOSS = 0.0")
  cfg = model.module.config
  assert (cfg.d_model, cfg.num_encoder_layers, cfg.whole_word_vocab_size) == (64, 2, 64)
  assert cfg.dropout_rate == 0.0 and cfg.dtype == "bfloat16"
  assert model.output_vocabulary.eos_id == 1
  from p5jax import feature_converters  # pylint: disable=g-import-not-at-top
  # Gin hands over a configurable subclass of the referenced class.
  assert issubclass(model.FEATURE_CONVERTER_CLS, feature_converters.P5EncDecFeatureConverter)
  num_params = sum(int(np.prod(s)) for s in convert.expected_param_shapes(cfg).values())
  assert num_params < 3_000_000


def test_model_gin_requires_dataset(repo_cwd):
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="DATASET"):
      gin.parse_config_files_and_bindings(["gin/models/tiny.gin"], [])
  finally:
    gin.clear_config()
