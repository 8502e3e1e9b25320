"""Tests for p5jax.decoding: exact arrays from fixed logit tables, no model."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p5jax import decoding

EOS = 1


# ------------------------------------------------------------------------------
# Toy "models": tokens_to_logits functions over fixed tables.
# ------------------------------------------------------------------------------


def markov_model(table_BxVxV):
  """Logits depend on the example (from the cache) and the fed token only."""
  table = jnp.asarray(table_BxVxV, jnp.float32)

  def tokens_to_logits(state):
    cache = state.cache
    logits = table[cache["example"], state.cur_token[:, 0]]
    return logits, dict(cache, cache_index=cache["cache_index"] + 1)

  return tokens_to_logits


class HashModel:
  """Logits depend on the whole prefix through a hashed history in the cache.

  The history lives in the cache, so wrong cache expansion or beam reordering
  changes the results.
  """

  def __init__(self, table_BxHxV):
    self.table = np.asarray(table_BxHxV, np.float32)
    self.buckets = self.table.shape[1]

  def _next_hist(self, hist, token):
    return (hist * 5 + token + 1) % self.buckets

  def tokens_to_logits(self, state):
    cache = state.cache
    hist = self._next_hist(cache["hist"], state.cur_token[:, 0])
    logits = jnp.asarray(self.table)[cache["example"], hist]
    return logits, {"example": cache["example"], "hist": hist,
                    "cache_index": cache["cache_index"] + 1}

  def init_cache(self, batch_size):
    return {"example": jnp.arange(batch_size, dtype=jnp.int32),
            "hist": jnp.zeros((batch_size,), jnp.int32),
            "cache_index": jnp.array(0, jnp.int32)}

  def log_prob(self, example, seq):
    """Exact log-likelihood of `seq` (ending at its EOS) for one example."""
    hist, cur, total = 0, 0, 0.0
    for tok in seq:
      hist = self._next_hist(hist, cur)
      logits = self.table[example, hist].astype(np.float64)
      log_z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
      total += logits[tok] - log_z
      cur = tok
      if tok == EOS:
        break
    return total


def markov_cache(batch_size):
  return {"example": jnp.arange(batch_size, dtype=jnp.int32),
          "cache_index": jnp.array(0, jnp.int32)}


def brevity(alpha, length):
  return ((5.0 + length) / 6.0) ** alpha


def pad_to(seq, length):
  return list(seq) + [0] * (length - len(seq))


def brute_force_top(model, example, candidates, alpha, k, length):
  """Top-k (ascending, best last) of candidate sequences by penalised score."""
  scored = sorted(
      (model.log_prob(example, s) / brevity(alpha, len(s)), tuple(s))
      for s in candidates)
  top = scored[-k:]
  return (np.array([pad_to(s, length) for _, s in top]),
          np.array([score for score, _ in top]))


def all_finished_sequences(vocab_size, length):
  """Every token sequence ending in its first EOS, of length <= `length`."""
  non_eos = [t for t in range(vocab_size) if t != EOS]
  for n in range(length):
    for prefix in itertools.product(non_eos, repeat=n):
      yield list(prefix) + [EOS]


def jit_decode(fn, **static):
  """jit with the decoding knobs static (tokens_to_logits is a Python fn)."""
  return jax.jit(functools.partial(fn, **static))


# Probabilities from a token to (PAD, EOS, A, B); the PAD row serves BOS.
_P_FROM = {
    0: [0.0, 0.1, 0.6, 0.3],
    1: [0.0, 1.0, 0.0, 0.0],
    2: [0.0, 0.7, 0.1, 0.2],
    3: [0.0, 0.25, 0.15, 0.6],
}


def _markov_table():
  probs = np.array([_P_FROM[t] for t in range(4)])
  # Example 1 is example 0 with A and B swapped.
  swap = [0, 1, 3, 2]
  probs_1 = probs[swap][:, swap]
  with np.errstate(divide="ignore"):
    logits = np.log(np.stack([probs, probs_1]))
  return np.maximum(logits, -1e9)


# ------------------------------------------------------------------------------
# Beam search.
# ------------------------------------------------------------------------------


_MARKOV_BEAM = jax.jit(functools.partial(
    decoding.beam_search, tokens_to_logits=markov_model(_markov_table()),
    eos_id=EOS, num_decodes=2))


class TestBeamSearch:

  @pytest.mark.parametrize("alpha", [0.0, 3.0])
  def test_markov_exact(self, alpha):
    # Hand-worked: step 0 keeps A(.6), B(.3), finishes E(.1); step 1 finishes
    # AE(.42), BE(.075), keeps BB(.18), AB(.12); step 2 finishes BBE(.045),
    # ABE(.03). alpha=0 picks {E, AE}; alpha=3 favours length: {BBE, AE}.
    seqs, scores = _MARKOV_BEAM(jnp.zeros((2, 3), jnp.int32), markov_cache(2),
                                alpha=alpha)
    if alpha == 0.0:
      want_0 = [[1, 0, 0], [2, 1, 0]]
      want_scores = [np.log(0.1), np.log(0.42)]
    else:
      want_0 = [[3, 3, 1], [2, 1, 0]]
      want_scores = [np.log(0.3 * 0.6 * 0.25) / brevity(alpha, 3),
                     np.log(0.6 * 0.7) / brevity(alpha, 2)]
    swap = np.array([0, 1, 3, 2])
    np.testing.assert_array_equal(seqs[0], want_0)
    np.testing.assert_array_equal(seqs[1], swap[np.array(want_0)])
    np.testing.assert_allclose(scores, [want_scores, want_scores], rtol=1e-5)

  def test_prompt_is_forced(self):
    # Decoder-input layout: [BOS, forced token, free].
    inputs = jnp.array([[0, 3, 0], [0, 2, 0]], jnp.int32)
    seqs, scores = _MARKOV_BEAM(inputs, markov_cache(2), alpha=0.0)
    np.testing.assert_array_equal(seqs[:, :, 0], [[3, 3], [2, 2]])
    # Best continuation of B in example 0: BE (.25) > BB (.6) then EOS (.25).
    # In example 1 (A, B swapped) the forced A plays the role of B.
    np.testing.assert_array_equal(seqs[:, -1], [[3, 1, 0], [2, 1, 0]])
    np.testing.assert_allclose(scores[:, -1], np.log(0.25), rtol=1e-5)

  def test_equals_brute_force(self):
    # V=3, length 4: at most 2**t live prefixes and 3 * 2**t candidates per
    # step, so 12 beams (24 candidates) make the search exhaustive.
    vocab, length, beams, batch = 3, 4, 12, 2
    model = HashModel(np.random.RandomState(0).randn(batch, 101, vocab) * 2)
    run = jit_decode(decoding.beam_search, tokens_to_logits=model.tokens_to_logits,
                     eos_id=EOS, num_decodes=beams)
    inputs = jnp.zeros((batch, length), jnp.int32)
    for alpha in (0.0, 0.6):
      seqs, scores = run(inputs, model.init_cache(batch), alpha=alpha)
      for b in range(batch):
        want_seqs, want_scores = brute_force_top(
            model, b, all_finished_sequences(vocab, length), alpha, beams, length)
        np.testing.assert_array_equal(seqs[b], want_seqs)
        np.testing.assert_allclose(scores[b], want_scores, rtol=1e-5)
    # A cache the caller already expanded to batch * beams gives the same.
    expanded = decoding.cache_map(
        lambda x: decoding.flat_batch_beam_expand(x, beams), model.init_cache(batch))
    assert expanded["example"].shape == (batch * beams,)
    assert expanded["cache_index"].shape == ()
    exp_seqs, exp_scores = run(inputs, expanded, alpha=0.6)
    np.testing.assert_array_equal(exp_seqs, seqs)
    np.testing.assert_allclose(exp_scores, scores, rtol=1e-6)

  def test_bad_cache_shape_is_a_clear_error(self):
    model = HashModel(np.zeros((2, 7, 4)))
    with pytest.raises(decoding.DecodingError, match="batch=2 or batch\\*beams=6"):
      decoding.beam_search(jnp.zeros((2, 3), jnp.int32), model.init_cache(5),
                           model.tokens_to_logits, eos_id=EOS, num_decodes=3)


# ------------------------------------------------------------------------------
# Item trie.
# ------------------------------------------------------------------------------


class TestItemTrie:

  def test_layout(self):
    # Items: [5, 6], [5], [7]; every path gets EOS=1 appended.
    trie = decoding.build_item_trie([[5, 6], [5], [7]], vocab_size=8, eos_id=EOS)
    # Nodes in creation order: 0 root, 1 "5", 2 "5 6", 3 "5 6 EOS" (item 0),
    # 4 "5 EOS" (item 1), 5 "7", 6 "7 EOS" (item 2).
    np.testing.assert_array_equal(trie.node_edge_start, [0, 2, 4, 5, 5, 5, 6, 6])
    np.testing.assert_array_equal(trie.edge_token, [5, 7, 1, 6, 1, 1])
    np.testing.assert_array_equal(trie.edge_child, [1, 5, 4, 2, 3, 6])
    np.testing.assert_array_equal(trie.item_id_of, [-1, -1, -1, 0, 1, -1, 2])
    assert (trie.max_degree, trie.max_depth, trie.num_items) == (2, 3, 3)
    tokens, children, valid = trie.window(jnp.array([0, 1, 3, -1]))
    np.testing.assert_array_equal(tokens, [[5, 7], [1, 6], [0, 0], [0, 0]])
    np.testing.assert_array_equal(children, [[1, 5], [4, 2], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(valid.any(-1), [True, True, False, False])
    np.testing.assert_array_equal(
        trie.child(jnp.array([0, 0, 1, 4]), jnp.array([7, 6, 1, 1])), [5, -1, 4, -1])

  def test_item_indices(self):
    trie = decoding.build_item_trie([[5, 6], [5], [7]], vocab_size=8, eos_id=EOS)
    seqs = jnp.array([[[5, 6, 1, 0], [5, 1, 0, 0]],
                      [[7, 1, 5, 5], [5, 6, 0, 0]],
                      [[6, 1, 0, 0], [7, 7, 1, 0]]])
    np.testing.assert_array_equal(decoding.item_indices(trie, seqs),
                                  [[0, 1], [2, -1], [-1, -1]])

  @pytest.mark.parametrize("seqs, match", [
      ([[5], []], "Item 1 has an empty"),
      ([[5, 1]], "Item 0, token position 1"),
      ([[0, 5]], "Item 0, token position 0"),
      ([[5, 9]], "outside the vocabulary"),
      ([[5, 6], [7], [5, 6]], "Items 0 and 2 have the same tokens"),
  ])
  def test_bad_catalog(self, seqs, match):
    with pytest.raises(decoding.DecodingError, match=match):
      decoding.build_item_trie(seqs, vocab_size=8, eos_id=EOS)

  def test_memory_scales_with_nodes_not_vocab(self):
    rng = np.random.RandomState(0)
    items = {tuple(rng.randint(2, 32000, size=rng.randint(2, 5)))
             for _ in range(2000)}
    trie = decoding.build_item_trie(sorted(items), vocab_size=32128, eos_id=EOS)
    assert trie.nbytes() <= 16 * trie.num_nodes + 4
    assert trie.num_items == len(items)


# ------------------------------------------------------------------------------
# Constrained beam search.
# ------------------------------------------------------------------------------


def _constrained_setup():
  vocab, batch = 6, 2
  model = HashModel(np.random.RandomState(3).randn(batch, 211, vocab) * 2)
  # The unconstrained best of each example, kept out of the catalog.
  unconstrained_best = [
      brute_force_top(model, b, all_finished_sequences(vocab, 4), 0.6, 1, 4)[0][0]
      for b in range(batch)]
  catalog = [[3, 2], [2, 2, 3], [3], [4, 5, 2], [2, 4], [5, 5, 5], [4]]
  padded_catalog = [pad_to(c + [EOS], 4) for c in catalog]
  for best in unconstrained_best:  # the constraint must change the answer
    assert list(best) not in padded_catalog
  return model, catalog, vocab


class TestConstrainedBeamSearch:

  def test_valid_distinct_and_exact(self):
    model, catalog, vocab = _constrained_setup()
    trie = decoding.build_item_trie(catalog, vocab_size=vocab, eos_id=EOS)
    beams, length = 6, 4
    run = jit_decode(decoding.beam_search, tokens_to_logits=model.tokens_to_logits,
                     eos_id=EOS, num_decodes=beams, alpha=0.6)
    # An all -1 `exclude` excludes nothing (and reuses the compiled loop).
    seqs, scores = run(jnp.zeros((2, length), jnp.int32), model.init_cache(2),
                       constraint=trie, exclude=jnp.full((2, 2), -1))
    items = np.asarray(decoding.item_indices(trie, seqs))
    for b in range(2):
      assert (items[b] >= 0).all() and len(set(items[b])) == beams
      # Every trie level has at most 7 edges <= 2 * beams, so it is exact.
      want_seqs, want_scores = brute_force_top(
          model, b, [c + [EOS] for c in catalog], 0.6, beams, length)
      np.testing.assert_array_equal(seqs[b], want_seqs)
      np.testing.assert_allclose(scores[b], want_scores, rtol=1e-5)

    # exclude: the best item of example 0 and two items of example 1 vanish.
    exclude = jnp.array([[items[0, -1], -1], [items[1, -1], items[1, -2]]])
    ex_seqs, ex_scores = run(jnp.zeros((2, length), jnp.int32),
                             model.init_cache(2), constraint=trie, exclude=exclude)
    ex_items = np.asarray(decoding.item_indices(trie, ex_seqs))
    for b in range(2):
      banned = {int(i) for i in exclude[b] if i >= 0}
      allowed = [c + [EOS] for i, c in enumerate(catalog) if i not in banned]
      want_seqs, _ = brute_force_top(model, b, allowed, 0.6, beams, length)
      kept = ex_items[b] >= 0
      assert not banned & set(ex_items[b].tolist())
      # Example 1 has 5 items left for 6 beams: each item comes back once, the
      # spare slot is an empty filler with the lowest score, first.
      assert kept.sum() == len(allowed) == beams - b
      assert len(set(ex_items[b][kept].tolist())) == kept.sum()
      np.testing.assert_array_equal(ex_seqs[b][kept], want_seqs)
      assert (np.asarray(ex_scores[b])[~kept] < decoding.NEG_INF / 2).all()
      assert not kept[:beams - kept.sum()].any()

    # Jitted equals eager (the while loop run op by op in Python).
    with jax.disable_jit():
      eager_seqs, eager_scores = run(jnp.zeros((2, length), jnp.int32),
                                     model.init_cache(2), constraint=trie,
                                     exclude=exclude)
    np.testing.assert_array_equal(eager_seqs, ex_seqs)
    np.testing.assert_allclose(eager_scores, ex_scores, rtol=1e-6)

  def test_excluded_items_never_take_a_beam(self):
    # One token per item (item tokens): excluded items are refused when their
    # last token would be written, so K beams still return K allowed items
    # even when the excluded ones are the most likely.
    model, _, vocab = _constrained_setup()
    catalog = [[2], [3], [4], [5]]
    trie = decoding.build_item_trie(catalog, vocab_size=vocab, eos_id=EOS)
    run = jit_decode(decoding.beam_search, tokens_to_logits=model.tokens_to_logits,
                     eos_id=EOS, num_decodes=2, alpha=0.0)
    seqs, _ = run(jnp.zeros((2, 3), jnp.int32), model.init_cache(2), constraint=trie,
                  exclude=jnp.full((2, 1), -1))
    best = np.asarray(decoding.item_indices(trie, seqs))[:, ::-1]  # best first
    exclude = jnp.asarray(best, jnp.int32)  # ban each example's top two
    seqs, scores = run(jnp.zeros((2, 3), jnp.int32), model.init_cache(2),
                       constraint=trie, exclude=exclude)
    items = np.asarray(decoding.item_indices(trie, seqs))
    for b in range(2):
      allowed = [c + [EOS] for i, c in enumerate(catalog) if i not in set(best[b])]
      want_seqs, want_scores = brute_force_top(model, b, allowed, 0.0, 2, 3)
      assert (items[b] >= 0).all() and not set(items[b]) & set(best[b])
      np.testing.assert_array_equal(seqs[b], want_seqs)
      np.testing.assert_allclose(scores[b], want_scores, rtol=1e-5)

  @pytest.mark.parametrize("constrained", [False, True])
  def test_first_step_per_example_changes_nothing(self, constrained):
    # With a batch-sized cache the first step runs on one row per example;
    # results equal running it on every beam, fillers included (here the
    # root has 4 children < 2 * beams, and an exclusion leaves 5 items for 6
    # beams), with a forced prompt token in example 1.
    model, catalog, vocab = _constrained_setup()
    trie = decoding.build_item_trie(catalog, vocab_size=vocab, eos_id=EOS)
    rows_fed = []

    def counting_tokens_to_logits(state):
      rows_fed.append(state.cur_token.shape[0])
      return model.tokens_to_logits(state)

    kwargs = {}
    if constrained:
      kwargs = dict(constraint=trie, exclude=jnp.array([[-1, -1], [0, 1]]))
    inputs = jnp.array([[0, 0, 0, 0], [0, 3, 0, 0]], jnp.int32)
    results = {}
    for per_example in (True, False):
      rows_fed.clear()
      run = jit_decode(decoding.beam_search, tokens_to_logits=counting_tokens_to_logits,
                       eos_id=EOS, num_decodes=6, alpha=0.6,
                       first_step_per_example=per_example)
      results[per_example] = run(inputs, model.init_cache(2), **kwargs)
      # Traced calls: [shared first step, loop body] or [loop body].
      assert rows_fed == ([2, 12] if per_example else [12])
    np.testing.assert_array_equal(results[True][0], results[False][0])
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-6)
    # Filler slots (forced prompt / too few items) are part of the comparison.
    assert (np.asarray(results[True][1]) < decoding.NEG_INF / 2).any()

  def test_twenty_beams_large_random_catalog(self):
    vocab, batch, beams = 12, 3, 20
    rng = np.random.RandomState(5)
    catalog = sorted({tuple(rng.randint(2, vocab, size=rng.randint(1, 4)))
                      for _ in range(150)})
    trie = decoding.build_item_trie(catalog, vocab_size=vocab, eos_id=EOS)
    model = HashModel(rng.randn(batch, 307, vocab) * 3)
    exclude = jnp.array([[0, 1, 2, -1], [5, -1, -1, -1], [-1, -1, -1, -1]])
    run = jit_decode(decoding.beam_search, tokens_to_logits=model.tokens_to_logits,
                     eos_id=EOS, num_decodes=beams)
    seqs, scores = run(jnp.zeros((batch, 5), jnp.int32), model.init_cache(batch),
                       constraint=trie, exclude=exclude)
    assert seqs.shape == (batch, beams, 5) and scores.shape == (batch, beams)
    items = np.asarray(decoding.item_indices(trie, seqs))
    assert np.all(np.diff(np.asarray(scores), axis=1) >= 0)  # ascending
    for b in range(batch):
      assert (items[b] >= 0).all() and len(set(items[b].tolist())) == beams
      assert not set(items[b].tolist()) & set(np.asarray(exclude[b]).tolist())
      for item, score in zip(items[b], np.asarray(scores[b])):
        seq = list(catalog[item]) + [EOS]
        np.testing.assert_allclose(
            score, model.log_prob(b, seq) / brevity(0.6, len(seq)), rtol=1e-5)

  def test_constraint_errors(self):
    model = HashModel(np.zeros((1, 7, 6)))
    trie = decoding.build_item_trie([[2, 3, 4]], vocab_size=6, eos_id=EOS)
    args = (jnp.zeros((1, 3), jnp.int32), model.init_cache(1),
            model.tokens_to_logits)
    with pytest.raises(decoding.DecodingError, match="longest item id"):
      decoding.beam_search(*args, eos_id=EOS, constraint=trie)
    small = decoding.build_item_trie([[2]], vocab_size=5, eos_id=EOS)
    with pytest.raises(decoding.DecodingError, match="vocab_size=5"):
      decoding.beam_search(*args, eos_id=EOS, constraint=small)
    with pytest.raises(decoding.DecodingError, match="needs an item trie"):
      decoding.beam_search(*args, eos_id=EOS, exclude=jnp.zeros((1, 1), jnp.int32))


# ------------------------------------------------------------------------------
# Temperature sampling.
# ------------------------------------------------------------------------------


def greedy_reference(model, batch_size, length):
  """Plain Python greedy decoding of a HashModel."""
  out = np.zeros((batch_size, length), np.int32)
  for b in range(batch_size):
    hist, cur = 0, 0
    for t in range(length):
      hist = model._next_hist(hist, cur)
      cur = int(np.argmax(model.table[b, hist]))
      out[b, t] = cur
      if cur == EOS:
        break
  return out


class TestTemperatureSample:

  @pytest.mark.parametrize("kwargs", [dict(temperature=0.0),
                                      dict(temperature=1.0, topk=1)])
  def test_greedy_limits(self, kwargs):
    model = HashModel(np.random.RandomState(6).randn(2, 97, 5) * 2)
    seqs, log_probs = decoding.temperature_sample(
        jnp.zeros((2, 6), jnp.int32), model.init_cache(2), model.tokens_to_logits,
        eos_id=EOS, decode_rng=jax.random.PRNGKey(1), num_decodes=3, **kwargs)
    want = greedy_reference(model, 2, 6)
    for d in range(3):
      np.testing.assert_array_equal(seqs[:, d], want)
    np.testing.assert_allclose(log_probs, 0.0)  # rescaled: greedy steps cost 0

  def test_log_probs_and_prompt(self):
    model = HashModel(np.random.RandomState(7).randn(2, 97, 5))
    run = jit_decode(decoding.temperature_sample,
                     tokens_to_logits=model.tokens_to_logits, eos_id=EOS,
                     num_decodes=8, rescale_log_probs=False)
    inputs = jnp.array([[0, 3, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.int32)
    rng = jax.random.PRNGKey(2)
    seqs, log_probs = run(inputs, model.init_cache(2), decode_rng=rng)
    np.testing.assert_array_equal(seqs[0, :, 0], 3)
    assert np.all(np.diff(np.asarray(log_probs), axis=1) >= 0)
    for b in range(2):
      for d in range(8):
        seq = [int(t) for t in seqs[b, d]]
        # The forced prompt token is excluded from the log-prob.
        want = model.log_prob(b, seq) - (model.log_prob(b, seq[:1]) if b == 0 else 0)
        if EOS in seq:
          np.testing.assert_allclose(log_probs[b, d], want, rtol=1e-4)
    assert len({tuple(np.asarray(s)) for s in seqs[1]}) > 1  # it does sample

  def test_constrained_samples_are_items(self):
    model = HashModel(np.random.RandomState(8).randn(2, 131, 6))
    catalog = [[3, 2], [2, 2, 3], [3], [4, 5, 2], [2, 4], [5, 5, 5], [4]]
    trie = decoding.build_item_trie(catalog, vocab_size=6, eos_id=EOS)
    exclude = jnp.array([[2, 6], [-1, -1]])
    seqs, log_probs = decoding.temperature_sample(
        jnp.zeros((2, 4), jnp.int32), model.init_cache(2), model.tokens_to_logits,
        eos_id=EOS, decode_rng=jax.random.PRNGKey(3), num_decodes=20,
        temperature=2.0, constraint=trie, exclude=exclude, rescale_log_probs=False)
    items = np.asarray(decoding.item_indices(trie, seqs))
    assert (items >= 0).all()
    assert not {2, 6} & set(items[0].tolist())
    assert len(set(items[1].tolist())) > 3
    for b, d in [(0, 0), (1, 19)]:
      seq = list(catalog[items[b, d]]) + [EOS]
      np.testing.assert_allclose(log_probs[b, d], model.log_prob(b, seq), rtol=1e-4)


# ------------------------------------------------------------------------------
# Candidate ranking.
# ------------------------------------------------------------------------------


def test_rank_candidates_planted_best():
  num_candidates = 5
  # A fake score_batch: log-likelihood = -|target - planted| per row.
  planted = jnp.array([3, 0])

  def score_fn(params, batch):
    del params
    example = batch["example"]
    return -jnp.abs(batch["candidate"] - planted[example]).astype(jnp.float32)

  batch = {
      "example": jnp.repeat(jnp.arange(2), num_candidates),
      "candidate": jnp.tile(jnp.arange(num_candidates), 2),
  }
  rank = jax.jit(decoding.score_and_rank_candidates,
                 static_argnames=("score_fn", "num_candidates"))
  ranking, scores = rank(score_fn, None, batch, num_candidates=num_candidates)
  np.testing.assert_array_equal(ranking[:, 0], [3, 0])
  np.testing.assert_array_equal(ranking[1], [0, 1, 2, 3, 4])
  np.testing.assert_allclose(scores[0], [0, -1, -1, -2, -3])
  mask = jnp.array([[True, True, True, False, True], [True] * 5])
  ranking, scores = decoding.rank_candidates(score_fn(None, batch), num_candidates,
                                             candidate_mask=mask)
  np.testing.assert_array_equal(ranking[0], [2, 4, 1, 0, 3])
  assert scores[0, -1] <= decoding.NEG_INF
