"""Jitted decoding: beam search, temperature sampling, item-ID constraint.

This module turns a step function (`tokens_to_logits`) into decoded sequences.
It keeps T5X's names, signatures and conventions so T5X users feel at home:

* `inputs` is `[batch, length]` int32 in decoder-input layout: position 0 is
  the BOS token 0 and a non-zero `inputs[:, i + 1]` forces output position `i`
  (a prompt); all-zero `inputs` means free decoding.
* `tokens_to_logits(DecodingState) -> (logits [batch * beams, vocab], cache)`;
  beam search feeds its first step `batch` rows when the cache is batch-sized
  (all beams start identical; see `first_step_per_example`).
* `cache` is the model's autoregressive cache. Its array leaves may have a
  leading (after `cache_offset` scan axes) dim of `batch` (T5X convention: the
  decoder expands them) or `batch * beams` (already expanded by the caller with
  `flat_batch_beam_expand`); the choice is made statically from the shapes.
  Scalar leaves and the T5X bookkeeping leaves (`cache_index`, `cached_bias`,
  `position_embedder_index`) are never expanded, nor are the precomputed
  cross-attention keys/values (`cached_cross_key`, `cached_cross_value`):
  they stay per example, shared by its beams, and the model's attention
  broadcasts them over the beam rows.
* Results are `(sequences [batch, num_decodes, max_decode_len],
  scores [batch, num_decodes])` sorted ascending by score: the best is last.
* Everything runs inside `lax.while_loop`: no Python callback per step.

Item-ID constraint (the part T5X does not have): `build_item_trie` turns the
token ids of every catalog item into an `ItemTrie`, a pytree of int32 arrays in
CSR layout (per node, its child edges sorted by token). Passing it as
`constraint=` to `beam_search`/`temperature_sample` makes every decode a valid
catalog item id followed by EOS; `exclude=` additionally forbids given items
per example (e.g. the user's history): a per-example item mask built once
before the loop refuses an excluded item's last token (and its EOS), so
excluded items never occupy a beam. Every beam carries its trie node; at
each step the allowed tokens of that node are gathered as a fixed-width window
of `max_degree` edges, so the per-step work is `O(batch * beams * max_degree)`
on top of the model, and top-k runs over allowed tokens only.

Why CSR and not a dense `[nodes, vocab]` table: with 100k items of ~4 tokens
the trie has ~500k nodes; a dense int32 table at a 32k vocab would take
~64 GB. The CSR arrays take ~16 bytes per node (`node_edge_start`,
`edge_token`, `edge_child`, `item_id_of`), i.e. ~8 MB for that catalog.

Scores of constrained beams are true model log-likelihoods: disallowed tokens
are removed *after* the log-softmax over the full vocabulary (as Hugging Face's
`prefix_allowed_tokens_fn` does), so ranking items by score ranks them by
P(item id | prompt) rather than by a trie-renormalised probability.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import flax
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# "Effective negative infinity" for masking (T5X's value). Anything below
# `_INVALID` is treated as an impossible hypothesis (a filler beam).
NEG_INF = np.array(-1.0e7, dtype=np.float32)
_INVALID = NEG_INF / 2
# Temperatures at or below this are greedy (avoids exp(1/temperature) blow-up).
MIN_TEMPERATURE = np.array(1e-4, dtype=np.float32)

# Cache leaves that are bookkeeping, not per-example state (as in T5X).
_CACHE_NON_BATCH_LEAVES = ("cache_index", "cached_bias", "position_embedder_index")
# Per-example leaves that all beams of an example share and that never change
# while decoding (the encoder keys/values of each cross-attention, see
# `layers.MultiHeadDotProductAttention`): never expanded per beam nor
# reordered, so a step neither copies nor gathers them.
_CACHE_SHARED_LEAVES = ("cached_cross_key", "cached_cross_value")


class DecodingError(ValueError):
  """Bad arguments to a decoding function or bad catalog for the item trie."""


@flax.struct.dataclass
class DecodingState:
  """What `tokens_to_logits` sees at each step (T5X's `DecodingState`).

  Attributes:
    cur_index: scalar (beam search) or [batch * num_decodes] (sampling) int32
      position of the token being fed in the `sequences` array.
    sequences: [batch * num_decodes, max_decode_len + 1] int32 prefixes
      including the leading BOS position.
    cur_token: [batch * num_decodes, 1] int32 token fed at this step.
    cache: the flattened autoregressive cache (leading dim batch * beams).
  """
  cur_index: jnp.ndarray
  sequences: jnp.ndarray
  cur_token: jnp.ndarray
  cache: PyTree


TokensToLogits = Callable[[DecodingState], Tuple[jnp.ndarray, PyTree]]


# ------------------------------------------------------------------------------
# Beam-dimension helpers (T5X names).
# ------------------------------------------------------------------------------


def add_beam_dim(x: jnp.ndarray, beam_size: int, offset: int = 0) -> jnp.ndarray:
  """[..., batch, ...] -> [..., batch, beam, ...] by tiling; `offset` scan axes."""
  x = jnp.expand_dims(x, axis=offset + 1)
  reps = [1] * x.ndim
  reps[offset + 1] = beam_size
  return jnp.tile(x, reps)


def flatten_beam_dim(x: jnp.ndarray, offset: int = 0) -> jnp.ndarray:
  """[..., batch, beam, ...] -> [..., batch * beam, ...]."""
  shape = list(x.shape)
  beam = shape.pop(offset + 1)
  shape[offset] *= beam
  return x.reshape(shape)


def unflatten_beam_dim(x: jnp.ndarray, batch_size: int, beam_size: int,
                       offset: int = 0) -> jnp.ndarray:
  """[..., batch * beam, ...] -> [..., batch, beam, ...]."""
  if x.shape[offset] != batch_size * beam_size:
    raise DecodingError(
        f"Cannot unflatten axis {offset} of shape {x.shape} into "
        f"batch={batch_size} x beam={beam_size}.")
  shape = list(x.shape)
  return x.reshape(shape[:offset] + [batch_size, beam_size] + shape[offset + 1:])


def flat_batch_beam_expand(x: jnp.ndarray, beam_size: int,
                           offset: int = 0) -> jnp.ndarray:
  """[batch, ...] -> [batch * beam, ...], each example repeated in place.

  [e0, e1] with beam 2 -> [e0, e0, e1, e1], the layout every decoder here uses.
  """
  return flatten_beam_dim(add_beam_dim(x, beam_size, offset), offset)


# Name used in this project's design notes.
flat_batch_beam_expansion = flat_batch_beam_expand


def _leaf_name(path) -> Optional[str]:
  if not path:
    return None
  last = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return str(last)


def cache_map(fn: Callable[[jnp.ndarray], jnp.ndarray], cache: PyTree,
              apply_to_index: bool = False) -> PyTree:
  """Applies `fn` to every per-example array of a cache pytree.

  Skips scalars, T5X bookkeeping leaves (`cache_index` unless
  `apply_to_index`, `cached_bias`, `position_embedder_index`) and the
  beam-shared cross-attention leaves (`cached_cross_key`,
  `cached_cross_value`). Works on dicts, FrozenDicts and any other pytree.
  """
  skip = set(_CACHE_NON_BATCH_LEAVES) | set(_CACHE_SHARED_LEAVES)
  if apply_to_index:
    skip.discard("cache_index")

  def maybe_apply(path, x):
    if _leaf_name(path) in skip or jnp.ndim(x) == 0:
      return x
    return fn(x)

  return jax.tree_util.tree_map_with_path(maybe_apply, cache)


def _expand_cache(cache: PyTree, batch_size: int, beam_size: int,
                  offset: int) -> PyTree:
  """Brings every per-example cache array to a leading `batch * beam` dim."""

  def expand(x):
    lead = x.shape[offset]
    if lead == batch_size * beam_size:
      return x
    if lead == batch_size:
      return flat_batch_beam_expand(x, beam_size, offset)
    raise DecodingError(
        f"Cache leaf of shape {x.shape} has dim {lead} at axis {offset}; "
        f"expected batch={batch_size} or batch*beams={batch_size * beam_size}.")

  return cache_map(expand, cache)


def _cache_is_per_example(cache: PyTree, batch_size: int, offset: int) -> bool:
  """True iff every per-example cache leaf has dim `batch_size` at `offset`."""
  leads = []
  cache_map(lambda x: leads.append(x.shape[offset]) or x, cache)
  return all(lead == batch_size for lead in leads)


def _gather_beams(x: jnp.ndarray, beam_indices: jnp.ndarray) -> jnp.ndarray:
  """x [batch, old_beams, ...], beam_indices [batch, new_beams] -> [batch, new_beams, ...]."""
  idx = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _gather_cache_beams(cache: PyTree, beam_indices: jnp.ndarray,
                        offset: int) -> PyTree:
  """Reorders a flat [.., batch * beams, ..] cache by beam_indices [batch, beams]."""
  batch_size, beam_size = beam_indices.shape
  # Flat row ids of the chosen parents: b * beams + parent.
  flat_idx = (jnp.arange(batch_size)[:, None] * beam_size + beam_indices).reshape(-1)

  def gather(x):
    return jnp.take(x, flat_idx, axis=offset)

  return cache_map(gather, cache)


def brevity_penalty(alpha: float, length) -> jnp.ndarray:
  """GNMT length penalty ((5 + length) / 6) ** alpha (T5X's)."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


# ------------------------------------------------------------------------------
# Item-ID trie.
# ------------------------------------------------------------------------------


@flax.struct.dataclass
class ItemTrie:
  """Token trie over catalog item ids, as jit-friendly int32 arrays (CSR).

  Node 0 is the root. The children of node n are edges
  `node_edge_start[n] : node_edge_start[n + 1]`, sorted by `edge_token`; each
  item's path is its id tokens followed by `eos_id`, ending at a leaf.
  Node id -1 stands for "off the trie" (no allowed continuation).

  Attributes:
    node_edge_start: [num_nodes + 1] CSR row pointer.
    edge_token: [num_edges] token of each edge.
    edge_child: [num_edges] node each edge leads to.
    item_id_of: [num_nodes] item index of a leaf, -1 for inner nodes.
    vocab_size, eos_id: vocabulary facts the trie was built for.
    max_degree: most children of any node (width of the per-step window).
    max_depth: longest path in tokens, EOS included.
    num_items: catalog size.
  """
  node_edge_start: jnp.ndarray
  edge_token: jnp.ndarray
  edge_child: jnp.ndarray
  item_id_of: jnp.ndarray
  vocab_size: int = flax.struct.field(pytree_node=False)
  eos_id: int = flax.struct.field(pytree_node=False)
  max_degree: int = flax.struct.field(pytree_node=False)
  max_depth: int = flax.struct.field(pytree_node=False)
  num_items: int = flax.struct.field(pytree_node=False)

  @property
  def num_nodes(self) -> int:
    return self.item_id_of.shape[0]

  def nbytes(self) -> int:
    return sum(int(np.asarray(a).nbytes) for a in (
        self.node_edge_start, self.edge_token, self.edge_child, self.item_id_of))

  def window(self, nodes: jnp.ndarray):
    """Allowed continuations of `nodes` [...] as fixed-width windows.

    Returns:
      tokens [..., max_degree] (0 where invalid), children [..., max_degree]
      (-1 where invalid), valid [..., max_degree] bool.
    """
    on_trie = nodes >= 0
    safe = jnp.where(on_trie, nodes, 0)
    start = self.node_edge_start[safe]
    degree = jnp.where(on_trie, self.node_edge_start[safe + 1] - start, 0)
    slot = jnp.arange(self.max_degree, dtype=jnp.int32)
    valid = slot < degree[..., None]
    edge = jnp.where(valid, start[..., None] + slot, 0)
    tokens = jnp.where(valid, self.edge_token[edge], 0)
    children = jnp.where(valid, self.edge_child[edge], -1)
    return tokens, children, valid

  def child(self, nodes: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """Child of each node [...] along each token [...]; -1 if there is none."""
    window_tokens, children, valid = self.window(nodes)
    hit = valid & (window_tokens == tokens[..., None])
    return jnp.where(hit.any(-1), jnp.max(jnp.where(hit, children, -1), -1), -1)

  def item_of(self, nodes: jnp.ndarray) -> jnp.ndarray:
    """Item index of leaf nodes [...], -1 for inner or off-trie nodes."""
    return jnp.where(nodes >= 0, self.item_id_of[jnp.maximum(nodes, 0)], -1)


def build_item_trie(token_id_seqs: Sequence[Sequence[int]], vocab_size: int,
                    eos_id: int) -> ItemTrie:
  """Builds the item trie from each catalog item's id tokens (without EOS).

  Item index i is position i in `token_id_seqs`; the trie appends `eos_id` to
  every sequence, so one id may be a prefix of another.

  Raises:
    DecodingError: naming the item for an empty sequence, a token out of
      [1, vocab_size) or equal to eos_id, or two items with the same tokens.
  """
  if not 0 <= eos_id < vocab_size:
    raise DecodingError(f"eos_id={eos_id} is outside vocab_size={vocab_size}.")
  children: list = [{}]  # node -> {token: child}
  leaf_item = {}
  for item, seq in enumerate(token_id_seqs):
    seq = [int(t) for t in seq]
    if not seq:
      raise DecodingError(f"Item {item} has an empty token sequence.")
    for pos, tok in enumerate(seq):
      if tok <= 0 or tok >= vocab_size or tok == eos_id:
        raise DecodingError(
            f"Item {item}, token position {pos}: id {tok} is padding (0), EOS "
            f"({eos_id}) or outside the vocabulary of size {vocab_size}.")
    node = 0
    for tok in seq + [eos_id]:
      nxt = children[node].get(tok)
      if nxt is None:
        nxt = len(children)
        children[node][tok] = nxt
        children.append({})
      node = nxt
    if node in leaf_item:
      raise DecodingError(
          f"Items {leaf_item[node]} and {item} have the same tokens {seq}; "
          "item ids must tokenize uniquely.")
    leaf_item[node] = item

  num_nodes = len(children)
  degree = np.array([len(c) for c in children], dtype=np.int64)
  node_edge_start = np.zeros(num_nodes + 1, dtype=np.int32)
  node_edge_start[1:] = np.cumsum(degree)
  edge_token = np.empty(int(degree.sum()), dtype=np.int32)
  edge_child = np.empty_like(edge_token)
  depth = np.zeros(num_nodes, dtype=np.int32)
  for node, kids in enumerate(children):
    start = node_edge_start[node]
    for j, tok in enumerate(sorted(kids)):
      edge_token[start + j] = tok
      edge_child[start + j] = kids[tok]
      depth[kids[tok]] = depth[node] + 1  # children are created after parents
  item_id_of = np.full(num_nodes, -1, dtype=np.int32)
  for node, item in leaf_item.items():
    item_id_of[node] = item
  return ItemTrie(
      node_edge_start=jnp.asarray(node_edge_start),
      edge_token=jnp.asarray(edge_token),
      edge_child=jnp.asarray(edge_child),
      item_id_of=jnp.asarray(item_id_of),
      vocab_size=int(vocab_size),
      eos_id=int(eos_id),
      max_degree=max(int(degree.max()), 1),
      max_depth=int(depth.max()),
      num_items=len(leaf_item))


@jax.jit
def item_indices(trie: ItemTrie, sequences: jnp.ndarray) -> jnp.ndarray:
  """Maps decoded sequences [..., length] to item indices [...] (-1: not an item).

  A sequence is an item iff it is exactly that item's tokens followed by EOS
  (anything after the EOS is ignored). Jittable.
  """
  lead_shape = sequences.shape[:-1]
  length = min(sequences.shape[-1], trie.max_depth)
  tokens_TxN = sequences.reshape(-1, sequences.shape[-1])[:, :length].T

  def step(carry, tok_N):
    node_N, item_N = carry
    nxt_N = trie.child(node_N, tok_N)
    item_N = jnp.where((tok_N == trie.eos_id) & (node_N >= 0),
                       trie.item_of(nxt_N), item_N)
    # After EOS the walk stops; later tokens (padding) are ignored.
    nxt_N = jnp.where(tok_N == trie.eos_id, -1, nxt_N)
    return (nxt_N, item_N), None

  n = tokens_TxN.shape[1]
  init = (jnp.zeros((n,), jnp.int32), jnp.full((n,), -1, jnp.int32))
  (_, items_N), _ = lax.scan(step, init, tokens_TxN)
  return items_N.reshape(lead_shape)


def _exclusion_mask(trie: Optional[ItemTrie], exclude_BxX) -> Optional[jnp.ndarray]:
  """exclude [B, X] item indices (-1 padded) -> bool [B, num_items + 1].

  Built once before the decoding loop; the extra last column ("no item") is
  never set. Each step then gathers from it instead of comparing every
  candidate with all X excluded items (O(B*K*M) per step, not O(B*K*M*X)).
  """
  if exclude_BxX is None or trie is None:
    return exclude_BxX  # _check_constraint reports exclude without a trie
  exclude_BxX = jnp.asarray(exclude_BxX, jnp.int32)
  rows = exclude_BxX.shape[0]
  idx = jnp.where((exclude_BxX >= 0) & (exclude_BxX < trie.num_items), exclude_BxX,
                  trie.num_items)
  mask = jnp.zeros((rows, trie.num_items + 1), bool)
  mask = mask.at[jnp.arange(rows)[:, None], idx].set(True)
  return mask.at[:, trie.num_items].set(False)


def _excluded_children(trie: ItemTrie, children: jnp.ndarray,
                       excluded_BxN1: jnp.ndarray) -> jnp.ndarray:
  """Children [B, K, ...] whose only completion is an excluded item -> True.

  That is an excluded item's leaf (reached by EOS), or a node whose single
  continuation is EOS into such a leaf: the step that writes an excluded
  item's last token is already refused, so no beam is spent on it (with one
  token per item, a heavy user's history would otherwise fill the beam).
  Nodes with other continuations (an id that prefixes another id) stay open.
  """
  on_trie = children >= 0
  safe = jnp.where(on_trie, children, 0)
  start = trie.node_edge_start[safe]
  degree = trie.node_edge_start[safe + 1] - start
  edge = jnp.minimum(start, trie.edge_token.shape[0] - 1)
  only_eos = on_trie & (degree == 1) & (trie.edge_token[edge] == trie.eos_id)
  items = jnp.where(only_eos, trie.item_of(trie.edge_child[edge]), trie.item_of(children))
  items = jnp.where(items >= 0, items, trie.num_items).reshape(items.shape[0], -1)
  return jnp.take_along_axis(excluded_BxN1, items, axis=1).reshape(children.shape)


def _check_constraint(constraint, exclude, vocab_size, max_decode_len):
  if exclude is not None and constraint is None:
    raise DecodingError("`exclude` needs an item trie passed as `constraint`.")
  if constraint is None:
    return
  if not isinstance(constraint, ItemTrie):
    raise DecodingError(
        f"`constraint` must be an ItemTrie from build_item_trie, got "
        f"{type(constraint).__name__}.")
  if vocab_size != constraint.vocab_size:
    raise DecodingError(
        f"Item trie was built for vocab_size={constraint.vocab_size} but the "
        f"model emits {vocab_size} logits.")
  if max_decode_len < constraint.max_depth:
    raise DecodingError(
        f"max_decode_len={max_decode_len} is shorter than the longest item id "
        f"plus EOS ({constraint.max_depth} tokens).")


def _prompt_inputs(inputs: jnp.ndarray, max_decode_len: Optional[int]):
  """Returns (max_decode_len, inputs padded/truncated to [B, max_decode_len + 1])."""
  if inputs.ndim != 2:
    raise DecodingError(f"`inputs` must be [batch, length], got {inputs.shape}.")
  if max_decode_len is None:
    max_decode_len = inputs.shape[1]
  width = max_decode_len + 1  # one extra zero so the last position is free
  inputs = inputs.astype(jnp.int32)
  if inputs.shape[1] >= width:
    return max_decode_len, inputs[:, :width]
  return max_decode_len, jnp.pad(inputs, ((0, 0), (0, width - inputs.shape[1])))


# ------------------------------------------------------------------------------
# Beam search.
# ------------------------------------------------------------------------------


@flax.struct.dataclass
class BeamState:
  """Beam search loop state; beams are kept sorted ascending (best last)."""
  cur_index: jnp.ndarray        # scalar int32: position of the fed token
  live_logprobs: jnp.ndarray    # [B, K] float32
  finished_scores: jnp.ndarray  # [B, K] float32 (length-normalised)
  live_seqs: jnp.ndarray        # [B, K, L + 1] int32, position 0 is BOS
  finished_seqs: jnp.ndarray    # [B, K, L + 1] int32
  finished_flags: jnp.ndarray   # [B, K] bool: slot holds a real hypothesis
  live_nodes: jnp.ndarray       # [B, K] int32 trie node (0 when unconstrained)
  cache: PyTree                 # leaves [.., B * K, ..]


def beam_search(inputs: jnp.ndarray,
                cache: PyTree,
                tokens_to_logits: TokensToLogits,
                eos_id: int,
                num_decodes: int = 4,
                alpha: float = 0.6,
                max_decode_len: Optional[int] = None,
                decode_rng: Optional[jnp.ndarray] = None,
                cache_offset: int = 0,
                constraint: Optional[ItemTrie] = None,
                exclude: Optional[jnp.ndarray] = None,
                first_step_per_example: bool = True,
                ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Beam search with T5X semantics, optionally constrained to catalog items.

  Keeps `num_decodes` live and `num_decodes` finished hypotheses per example;
  each step takes the top 2 * num_decodes extensions so that enough stay alive
  when some end in EOS. Finished scores are log-likelihood divided by
  `brevity_penalty(alpha, length)`. The loop stops at `max_decode_len` or when
  no live beam can still beat the worst finished one.

  Hypotheses are distinct by construction: each step extends distinct parents
  by distinct (parent, token) pairs, and filler beams (score below NEG_INF/2,
  e.g. when fewer than `num_decodes` items exist) never enter the finished set.
  With `constraint`, distinct finished sequences are therefore distinct items.

  Args:
    inputs: [batch, length] int32 decoder-input-layout prompt, zeros = free.
    cache: autoregressive cache; leaves lead with batch or batch * beams.
    tokens_to_logits: step function, see `DecodingState`.
    eos_id: end-of-sequence id.
    num_decodes: beam size = number of returned sequences.
    alpha: brevity penalty exponent.
    max_decode_len: output length; defaults to `inputs.shape[1]`.
    decode_rng: unused (beam search is deterministic); accepted for T5X parity.
    cache_offset: number of leading scan axes in cache arrays.
    constraint: optional `ItemTrie`: only catalog item ids + EOS are decoded.
    exclude: optional [batch, X] int32 item indices (-1 padded) not to return.
    first_step_per_example: when every per-example cache leaf is batch-sized,
      run the first step on `batch` rows (one per example: all beams start
      identical) instead of `batch * num_decodes`, then expand the cache per
      beam. Results are the same; set False for a `tokens_to_logits` that
      only handles `batch * num_decodes` rows (e.g. one closing over
      per-beam encodings, as T5X's models do).

  Returns:
    sequences [batch, num_decodes, max_decode_len] and scores
    [batch, num_decodes], sorted ascending by score (best last). If an example
    has no finished hypothesis, its live beams and log-probs are returned.
  """
  del decode_rng
  batch_size = inputs.shape[0]
  beam_size = num_decodes
  max_decode_len, prompt_BxL1 = _prompt_inputs(inputs, max_decode_len)
  seq_len = max_decode_len + 1  # + leading BOS slot
  # Longest possible hypothesis gives the smallest possible penalty divisor
  # for a live beam: used to decide early termination.
  max_brevity = brevity_penalty(alpha, max_decode_len)
  exclude = _exclusion_mask(constraint, exclude)

  # Only beam K-1 (the "best" slot) starts alive; the rest are fillers.
  init = BeamState(
      cur_index=jnp.array(0, jnp.int32),
      live_logprobs=jnp.tile(
          jnp.array([NEG_INF] * (beam_size - 1) + [0.0], jnp.float32),
          [batch_size, 1]),
      finished_scores=jnp.full((batch_size, beam_size), NEG_INF, jnp.float32),
      live_seqs=jnp.zeros((batch_size, beam_size, seq_len), jnp.int32),
      finished_seqs=jnp.zeros((batch_size, beam_size, seq_len), jnp.int32),
      finished_flags=jnp.zeros((batch_size, beam_size), jnp.bool_),
      live_nodes=jnp.zeros((batch_size, beam_size), jnp.int32),
      cache=cache)
  # All beams start from the same prefix and cache, so with a batch-sized
  # cache the first step runs once per example (B rows, not B * beams) and
  # its logits serve every beam; the cache is expanded per beam after it.
  share_first_step = (first_step_per_example and beam_size > 1 and max_decode_len > 0
                      and _cache_is_per_example(cache, batch_size, cache_offset))
  if not share_first_step:
    init = init.replace(cache=_expand_cache(cache, batch_size, beam_size, cache_offset))

  def cond_fn(state: BeamState):
    not_at_end = state.cur_index < max_decode_len
    best_live_BxO = state.live_logprobs[:, -1]
    worst_finished_BxO = jnp.where(state.finished_flags[:, 0],
                                   state.finished_scores[:, 0], NEG_INF)
    done_B = ((worst_finished_BxO > best_live_BxO / max_brevity) |
              (best_live_BxO < _INVALID))
    return not_at_end & ~jnp.all(done_B)

  def body_fn(state: BeamState, shared_step: bool = False) -> BeamState:
    """One step; `shared_step`: the first step, run on one row per example."""
    i = state.cur_index
    # R = rows per example fed to the model: 1 on a shared step (the alive
    # beam K-1 stands for all), else K. Per-row results [B, R, ...] broadcast
    # over the K beams below; on a shared step every beam has the same
    # prefix, node and logits, so this equals the unshared computation.
    rows = 1 if shared_step else beam_size
    live_seqs_BxRxL = state.live_seqs[:, beam_size - rows:]
    cur_BxRx1 = lax.dynamic_slice_in_dim(live_seqs_BxRxL, i, 1, axis=2)
    logits_BRxV, new_cache = tokens_to_logits(DecodingState(
        cur_index=i,
        sequences=live_seqs_BxRxL.reshape(batch_size * rows, seq_len),
        cur_token=cur_BxRx1.reshape(batch_size * rows, 1),
        cache=state.cache))
    vocab_size = logits_BRxV.shape[-1]
    _check_constraint(constraint, exclude, vocab_size, max_decode_len)
    logits_BxRxV = logits_BRxV.astype(jnp.float32).reshape(batch_size, rows, vocab_size)
    live_lp_BxKx1 = state.live_logprobs[..., None]

    # Candidate extensions per beam: all tokens, or the trie node's children.
    if constraint is None:
      log_probs_BxKxV = jax.nn.log_softmax(logits_BxRxV) + live_lp_BxKx1
      cands = beam_size * vocab_size
      cand_lp_BxC = log_probs_BxKxV.reshape(batch_size, cands)
    else:
      win_tok_BxRxM, win_child_BxRxM, win_valid_BxRxM = constraint.window(
          state.live_nodes[:, beam_size - rows:])
      if exclude is not None:
        win_valid_BxRxM &= ~_excluded_children(constraint, win_child_BxRxM, exclude)
      # Log-probs of the allowed tokens only: a logsumexp reduction plus a
      # gather, instead of materialising the full [B, K, V] log-softmax.
      log_z_BxRx1 = jax.nn.logsumexp(logits_BxRxV, axis=-1, keepdims=True)
      cand_lp_BxKxM = jnp.where(
          win_valid_BxRxM,
          jnp.take_along_axis(logits_BxRxV, win_tok_BxRxM, axis=2) - log_z_BxRx1
          + live_lp_BxKx1,
          NEG_INF + live_lp_BxKx1)
      win_shape = (batch_size, beam_size, win_tok_BxRxM.shape[-1])
      win_tok_BxKxM = jnp.broadcast_to(win_tok_BxRxM, win_shape)
      win_child_BxKxM = jnp.broadcast_to(win_child_BxRxM, win_shape)
      width = constraint.max_degree
      if width < 2:  # top_k below needs at least 2 * beams candidates
        pad = ((0, 0), (0, 0), (0, 2 - width))
        cand_lp_BxKxM = jnp.pad(cand_lp_BxKxM, pad, constant_values=2 * NEG_INF)
        win_tok_BxKxM = jnp.pad(win_tok_BxKxM, pad)
        win_child_BxKxM = jnp.pad(win_child_BxKxM, pad, constant_values=-1)
        width = 2
      cands = beam_size * width
      cand_lp_BxC = cand_lp_BxKxM.reshape(batch_size, cands)

    # Top 2K extensions over all beams (2K so K can live even if K end now).
    top_lp_Bx2K, top_idx_Bx2K = lax.top_k(cand_lp_BxC, 2 * beam_size)
    if constraint is None:
      parent_Bx2K = top_idx_Bx2K // vocab_size
      tok_Bx2K = top_idx_Bx2K % vocab_size
      child_Bx2K = jnp.zeros_like(tok_Bx2K)
    else:
      parent_Bx2K = top_idx_Bx2K // width
      tok_Bx2K = jnp.take_along_axis(
          win_tok_BxKxM.reshape(batch_size, cands), top_idx_Bx2K, axis=1)
      child_Bx2K = jnp.take_along_axis(
          win_child_BxKxM.reshape(batch_size, cands), top_idx_Bx2K, axis=1)

    # Prompt forcing: the single best beam is extended by the given token and
    # its log-prob is kept at 0 (T5X semantics); the other slots become fillers.
    forced_B = lax.dynamic_index_in_dim(prompt_BxL1, i + 1, axis=1, keepdims=False)
    in_prompt_B = forced_B != 0
    best_parent_B = jnp.argmax(state.live_logprobs, axis=1).astype(jnp.int32)
    forced_lp_Bx2K = jnp.concatenate(
        [jnp.zeros((batch_size, 1)),
         jnp.full((batch_size, 2 * beam_size - 1), NEG_INF)], axis=1)
    if constraint is not None:
      forced_child_B = constraint.child(
          jnp.take_along_axis(state.live_nodes, best_parent_B[:, None], 1)[:, 0],
          forced_B)
      forced_lp_Bx2K = jnp.where((forced_child_B >= 0)[:, None],
                                 forced_lp_Bx2K, NEG_INF)
      child_Bx2K = jnp.where(in_prompt_B[:, None], forced_child_B[:, None],
                             child_Bx2K)
    top_lp_Bx2K = jnp.where(in_prompt_B[:, None], forced_lp_Bx2K, top_lp_Bx2K)
    tok_Bx2K = jnp.where(in_prompt_B[:, None], forced_B[:, None], tok_Bx2K)
    parent_Bx2K = jnp.where(in_prompt_B[:, None], best_parent_B[:, None],
                            parent_Bx2K)

    top_seq_Bx2KxL = lax.dynamic_update_slice_in_dim(
        _gather_beams(state.live_seqs, parent_Bx2K), tok_Bx2K[..., None],
        i + 1, axis=2)
    is_valid_Bx2K = top_lp_Bx2K > _INVALID
    # As in T5X, a forced EOS (prompt = whole target) also ends the beam.
    newly_finished_Bx2K = (tok_Bx2K == eos_id) & is_valid_Bx2K

    # Live set: best K that did not just end, ascending (best last).
    alive_lp_Bx2K = jnp.where(newly_finished_Bx2K, NEG_INF + top_lp_Bx2K,
                              top_lp_Bx2K)
    _, keep_BxK = lax.top_k(alive_lp_Bx2K, beam_size)
    keep_BxK = jnp.flip(keep_BxK, axis=1)
    live_parent_BxK = jnp.take_along_axis(parent_Bx2K, keep_BxK, axis=1)

    # Finished set: merge old finished with the newly ended, keep best K.
    length_penalty = brevity_penalty(alpha, i + 1)
    new_scores_Bx2K = jnp.where(newly_finished_Bx2K,
                                top_lp_Bx2K / length_penalty, NEG_INF)
    all_scores = jnp.concatenate([state.finished_scores, new_scores_Bx2K], 1)
    all_flags = jnp.concatenate([state.finished_flags, newly_finished_Bx2K], 1)
    all_seqs = jnp.concatenate([state.finished_seqs, top_seq_Bx2KxL], 1)
    _, fin_BxK = lax.top_k(jnp.where(all_flags, all_scores, 2 * NEG_INF), beam_size)
    fin_BxK = jnp.flip(fin_BxK, axis=1)

    return BeamState(
        cur_index=i + 1,
        live_logprobs=jnp.take_along_axis(alive_lp_Bx2K, keep_BxK, axis=1),
        finished_scores=jnp.take_along_axis(all_scores, fin_BxK, axis=1),
        live_seqs=_gather_beams(top_seq_Bx2KxL, keep_BxK),
        finished_seqs=_gather_beams(all_seqs, fin_BxK),
        finished_flags=jnp.take_along_axis(all_flags, fin_BxK, axis=1),
        live_nodes=jnp.take_along_axis(child_Bx2K, keep_BxK, axis=1),
        # After a shared step every parent has the example's cache.
        cache=(_expand_cache(new_cache, batch_size, beam_size, cache_offset) if shared_step
               else _gather_cache_beams(new_cache, live_parent_BxK, cache_offset)))

  if share_first_step:
    # Step 0 always runs (index 0 < max_decode_len, the alive beam scores 0).
    init = body_fn(init, shared_step=True)
  final = lax.while_loop(cond_fn, body_fn, init)

  any_finished_B = jnp.any(final.finished_flags, axis=1)
  seqs = jnp.where(any_finished_B[:, None, None], final.finished_seqs,
                   final.live_seqs)
  scores = jnp.where(any_finished_B[:, None], final.finished_scores,
                     final.live_logprobs)
  return seqs[:, :, 1:], scores


# ------------------------------------------------------------------------------
# Temperature sampling.
# ------------------------------------------------------------------------------


@flax.struct.dataclass
class SamplingLoopState:
  """Sampling loop state; rows are batch * num_decodes, example-major."""
  cur_index: jnp.ndarray   # scalar int32
  sequences: jnp.ndarray   # [N, L + 1] int32, position 0 is BOS
  cache: PyTree
  ended: jnp.ndarray       # [N] bool
  rng: jnp.ndarray
  log_prob: jnp.ndarray    # [N] float32
  nodes: jnp.ndarray       # [N] int32 trie node (0 when unconstrained)


def _topk_mask(logits_NxC: jnp.ndarray, topk: int) -> jnp.ndarray:
  kth_Nx1 = lax.top_k(logits_NxC, topk)[0][:, -1:]
  return jnp.where(logits_NxC < kth_Nx1, NEG_INF, logits_NxC)


def _topp_mask(logits_NxC: jnp.ndarray, topp) -> jnp.ndarray:
  """Keeps the smallest set of tokens whose probability reaches `topp`."""
  sorted_NxC = -jnp.sort(-logits_NxC, axis=-1)
  cum_NxC = jnp.cumsum(jax.nn.softmax(sorted_NxC, axis=-1), axis=-1)
  # Number of tokens needed: first index where the cumulative mass >= topp.
  keep_N = jnp.sum(cum_NxC < topp, axis=-1) + 1
  keep_N = jnp.minimum(keep_N, logits_NxC.shape[-1])
  threshold_Nx1 = jnp.take_along_axis(sorted_NxC, keep_N[:, None] - 1, axis=-1)
  return jnp.where(logits_NxC < threshold_Nx1, NEG_INF, logits_NxC)


def temperature_sample(inputs: jnp.ndarray,
                       cache: PyTree,
                       tokens_to_logits: TokensToLogits,
                       eos_id: int,
                       decode_rng: Optional[jnp.ndarray] = None,
                       num_decodes: int = 1,
                       temperature: Union[float, jnp.ndarray] = 1.0,
                       topk: int = 0,
                       topp: float = 0.0,
                       cache_offset: int = 0,
                       max_decode_len: Optional[int] = None,
                       rescale_log_probs: bool = True,
                       constraint: Optional[ItemTrie] = None,
                       exclude: Optional[jnp.ndarray] = None,
                       ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Samples `num_decodes` sequences per example (T5X semantics).

  Temperatures <= MIN_TEMPERATURE decode greedily (argmax). `topk` > 0 keeps
  the k best tokens, `topp` > 0 the nucleus (at most one of them). Non-zero
  `inputs` positions are forced (prompt) and add nothing to the log-prob.
  After EOS a sequence emits padding 0.

  With `constraint`, tokens are drawn among the trie node's children only
  (so each sample is a catalog item; samples may repeat items). A sample whose
  forced prompt leaves the trie ends with log-prob <= NEG_INF.

  Args:
    inputs: [batch, length] int32 decoder-input-layout prompt, zeros = free.
    cache: autoregressive cache; leaves lead with batch or batch * num_decodes.
    tokens_to_logits: step function, see `DecodingState`.
    eos_id: end-of-sequence id.
    decode_rng: PRNG key (default PRNGKey(0)).
    num_decodes: samples per example.
    temperature: scalar or [batch] sampling temperature.
    topk: if > 0, sample among the top-k tokens only.
    topp: if > 0, nucleus sampling threshold.
    cache_offset: number of leading scan axes in cache arrays.
    max_decode_len: output length; defaults to `inputs.shape[1]`.
    rescale_log_probs: if True the returned log-probs are those of the
      distribution sampled from (temperature/top-k/top-p/constraint applied;
      greedy steps count 0), else those of the raw model.
    constraint: optional `ItemTrie`.
    exclude: optional [batch, X] item indices (-1 padded) never sampled.

  Returns:
    sequences [batch, num_decodes, max_decode_len] and log-probs
    [batch, num_decodes], sorted ascending by log-prob (best last).
  """
  if topk and topp:
    raise DecodingError("At most one of `topk` and `topp` may be non-zero.")
  if decode_rng is None:
    decode_rng = jax.random.PRNGKey(0)
  batch_size = inputs.shape[0]
  rows = batch_size * num_decodes
  max_decode_len, prompt_BxL1 = _prompt_inputs(inputs, max_decode_len)
  prompt_NxL1 = flat_batch_beam_expand(prompt_BxL1, num_decodes)
  temperature = jnp.asarray(temperature, jnp.float32)
  if temperature.ndim == 1:
    temperature = flat_batch_beam_expand(temperature, num_decodes)[:, None]
  if exclude is not None:
    exclude = _exclusion_mask(
        constraint, flat_batch_beam_expand(jnp.asarray(exclude, jnp.int32), num_decodes))

  init = SamplingLoopState(
      cur_index=jnp.array(0, jnp.int32),
      sequences=jnp.zeros((rows, max_decode_len + 1), jnp.int32),
      cache=_expand_cache(cache, batch_size, num_decodes, cache_offset),
      ended=jnp.zeros((rows,), jnp.bool_),
      rng=decode_rng,
      log_prob=jnp.zeros((rows,), jnp.float32),
      nodes=jnp.zeros((rows,), jnp.int32))

  def cond_fn(state: SamplingLoopState):
    return (state.cur_index < max_decode_len) & ~jnp.all(state.ended)

  def body_fn(state: SamplingLoopState) -> SamplingLoopState:
    i = state.cur_index
    rng, step_rng = jax.random.split(state.rng)
    cur_Nx1 = lax.dynamic_slice_in_dim(state.sequences, i, 1, axis=1)
    logits_NxV, new_cache = tokens_to_logits(DecodingState(
        cur_index=jnp.full((rows,), i, jnp.int32),
        sequences=state.sequences,
        cur_token=cur_Nx1,
        cache=state.cache))
    logits_NxV = logits_NxV.astype(jnp.float32)
    vocab_size = logits_NxV.shape[-1]
    _check_constraint(constraint, exclude, vocab_size, max_decode_len)
    raw_log_probs_NxV = jax.nn.log_softmax(logits_NxV)

    # Choose among candidate columns: all tokens, or the node's children.
    if constraint is None:
      cand_logits_NxC = logits_NxV
      raw_lp_NxC = raw_log_probs_NxV
      valid_NxC = None
    else:
      win_tok_NxM, win_child_NxM, valid_NxC = constraint.window(state.nodes)
      if exclude is not None:
        valid_NxC &= ~_excluded_children(constraint, win_child_NxM, exclude)
      cand_logits_NxC = jnp.where(
          valid_NxC, jnp.take_along_axis(logits_NxV, win_tok_NxM, axis=1), NEG_INF)
      raw_lp_NxC = jnp.take_along_axis(raw_log_probs_NxV, win_tok_NxM, axis=1)
    num_cands = cand_logits_NxC.shape[-1]

    scaled_NxC = cand_logits_NxC / jnp.maximum(temperature, MIN_TEMPERATURE)
    if topk:
      scaled_NxC = _topk_mask(scaled_NxC, min(topk, num_cands))
    if topp:
      scaled_NxC = _topp_mask(scaled_NxC, topp)
    # temperature is a scalar or [N, 1]; greedy rows take the argmax.
    greedy_N = jnp.broadcast_to(temperature <= MIN_TEMPERATURE, (rows, 1))[:, 0]
    choice_N = jnp.where(
        greedy_N, jnp.argmax(cand_logits_NxC, axis=-1),
        jax.random.categorical(step_rng, scaled_NxC, axis=-1)).astype(jnp.int32)

    if rescale_log_probs:
      step_lp_NxC = jax.nn.log_softmax(scaled_NxC, axis=-1)
      step_lp_N = jnp.where(
          greedy_N, 0.0,
          jnp.take_along_axis(step_lp_NxC, choice_N[:, None], 1)[:, 0])
    else:
      step_lp_N = jnp.take_along_axis(raw_lp_NxC, choice_N[:, None], 1)[:, 0]

    if constraint is None:
      token_N = choice_N
      child_N = jnp.zeros_like(choice_N)
      stuck_N = jnp.zeros((rows,), jnp.bool_)
    else:
      token_N = jnp.take_along_axis(win_tok_NxM, choice_N[:, None], 1)[:, 0]
      child_N = jnp.take_along_axis(win_child_NxM, choice_N[:, None], 1)[:, 0]
      stuck_N = ~jnp.any(valid_NxC, axis=-1)

    forced_N = lax.dynamic_index_in_dim(prompt_NxL1, i + 1, axis=1, keepdims=False)
    in_prompt_N = forced_N != 0
    if constraint is not None:
      forced_child_N = constraint.child(state.nodes, forced_N)
      child_N = jnp.where(in_prompt_N, forced_child_N, child_N)
      # A forced token that leaves the trie makes the sample impossible.
      stuck_N = jnp.where(in_prompt_N, forced_child_N < 0, stuck_N)
    token_N = jnp.where(in_prompt_N, forced_N, token_N)
    generating_N = ~in_prompt_N & ~state.ended

    log_prob_N = state.log_prob + jnp.where(generating_N, step_lp_N, 0.0)
    log_prob_N = jnp.where(stuck_N & ~state.ended, NEG_INF + log_prob_N, log_prob_N)
    emitted_N = jnp.where(state.ended | (stuck_N & ~in_prompt_N), 0, token_N)
    sequences = lax.dynamic_update_slice_in_dim(
        state.sequences, emitted_N[:, None], i + 1, axis=1)
    ended_N = state.ended | stuck_N | (generating_N & (token_N == eos_id))
    return SamplingLoopState(
        cur_index=i + 1, sequences=sequences, cache=new_cache, ended=ended_N,
        rng=rng, log_prob=log_prob_N, nodes=child_N)

  final = lax.while_loop(cond_fn, body_fn, init)
  seqs_BxNxL = unflatten_beam_dim(final.sequences[:, 1:], batch_size, num_decodes)
  log_prob_BxN = unflatten_beam_dim(final.log_prob, batch_size, num_decodes)
  order_BxN = jnp.argsort(log_prob_BxN, axis=-1)
  return (_gather_beams(seqs_BxNxL, order_BxN),
          jnp.take_along_axis(log_prob_BxN, order_BxN, axis=-1))


# ------------------------------------------------------------------------------
# Candidate ranking (direct recommendation, yes/no prompts).
# ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_candidates",))
def rank_candidates(log_likelihoods: jnp.ndarray, num_candidates: int,
                    candidate_mask: Optional[jnp.ndarray] = None):
  """Ranks each example's candidates by log-likelihood, best first.

  Args:
    log_likelihoods: [batch * num_candidates] from `model.score_batch` on a
      batch where example b's candidate c is row b * num_candidates + c.
    num_candidates: C.
    candidate_mask: optional [batch, C] bool; False rows (padding) rank last.

  Returns:
    ranking [batch, C] int32 candidate indices best first, and their scores
    [batch, C] (masked candidates score NEG_INF).
  """
  scores_BxC = log_likelihoods.reshape(-1, num_candidates).astype(jnp.float32)
  if candidate_mask is not None:
    scores_BxC = jnp.where(candidate_mask, scores_BxC, NEG_INF)
  # Stable descending sort: ties keep candidate order.
  ranking_BxC = jnp.argsort(-scores_BxC, axis=-1, stable=True).astype(jnp.int32)
  return ranking_BxC, jnp.take_along_axis(scores_BxC, ranking_BxC, axis=-1)


def score_and_rank_candidates(score_fn: Callable[..., jnp.ndarray], params: PyTree,
                              batch: Mapping[str, jnp.ndarray], num_candidates: int,
                              candidate_mask: Optional[jnp.ndarray] = None):
  """Scores a flattened candidate batch with `score_fn` and ranks per example.

  `score_fn(params, batch) -> [batch * C]` is typically
  `model.score_batch`; call this inside `jax.jit` (with `score_fn` and
  `num_candidates` static) to rank a whole candidate list in one call.
  """
  return rank_candidates(score_fn(params, batch), num_candidates, candidate_mask)
