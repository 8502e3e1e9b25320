"""Item-token embeddings started from training co-occurrence (optional).

With item tokens (``prepare --item_tokens``: one vocabulary piece per item,
see `p5jax.data.schema`) every item owns an embedding row. A model trained
from scratch must learn which items go together from a few tens of thousands
of prompts; on a CPU budget it only gets as far as popularity. Starting those
rows from a low-rank factorisation of the item co-occurrence matrix gives it
item similarity at step 0 (tied embeddings carry it to the output side too),
and training refines it like any other parameter.

Leak-free: co-occurrence counts pairs within `window` positions in the
*training* part of each sequence (``items[:-2]``, as the sequential training
prompts see it), never a validation or test target. Deterministic
(randomized SVD with a fixed seed), so every host computes the same rows.

Gin (``gin/experiments/ml100k_cpu.gin``)::

  train_script.train.param_init_fn = @item_init.CooccurrenceInit()
  item_init.CooccurrenceInit.dataset = %DATASET
"""
import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence

from flax.core import frozen_dict
import gin
import jax
import numpy as np

from p5jax.data import schema


class ItemInitError(ValueError):
  """The dataset or vocabulary cannot give items embedding rows of their own."""


def cooccurrence_matrix(sequences: Sequence[Sequence[int]], num_items: int, window: int):
  """Symmetric scipy CSR [N, N]: how often two items are <= `window` apart."""
  from scipy import sparse  # pylint: disable=g-import-not-at-top
  rows: List[np.ndarray] = []
  cols: List[np.ndarray] = []
  for seq in sequences:
    s = np.asarray(seq, np.int64)
    for d in range(1, window + 1):
      if len(s) > d:
        rows.append(s[:-d])
        cols.append(s[d:])
  r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
  c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
  data = np.ones(2 * len(r), np.float64)
  m = sparse.coo_matrix((data, (np.concatenate([r, c]), np.concatenate([c, r]))),
                        shape=(num_items, num_items))
  return m.tocsr()


def spectral_item_vectors(cooc, dim: int, seed: int = 0) -> np.ndarray:
  """[N, dim] rows whose dot products approximate the normalised co-occurrence.

  ``log1p`` damps heavy pairs, ``D^-1/2 C D^-1/2`` removes sheer popularity
  (the model learns that from the targets), and a randomized truncated SVD
  keeps `dim` components: rows are ``U sqrt(S)``.
  """
  from scipy import sparse  # pylint: disable=g-import-not-at-top
  from sklearn.utils.extmath import randomized_svd  # pylint: disable=g-import-not-at-top
  c = cooc.astype(np.float64).copy()
  c.data = np.log1p(c.data)
  degree = np.asarray(c.sum(axis=1)).ravel()
  inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
  norm = sparse.diags(inv_sqrt) @ c @ sparse.diags(inv_sqrt)
  k = min(dim, min(norm.shape) - 1)
  if k < 1:
    raise ItemInitError(f"too few items ({norm.shape[0]}) for a {dim}-dim factorisation")
  u, s, _ = randomized_svd(norm, n_components=k, random_state=seed)
  vectors = u * np.sqrt(s)
  if k < dim:
    vectors = np.pad(vectors, [(0, 0), (0, dim - k)])
  return vectors


def item_token_ids(catalog, vocabulary) -> np.ndarray:
  """Vocabulary id of each catalog item's own piece (``<i7391>``), catalog order."""
  ids = []
  for item, tokens in zip(catalog.item_ids, catalog.item_tokens(vocabulary)):
    piece = tokens[-1] if tokens else None
    if piece is None or vocabulary.decode([piece]).strip() != schema.item_token(item):
      raise ItemInitError(
          f"item {item!r} is not one vocabulary piece ({tokens}): prepare the dataset "
          "with item tokens (ITEM_TOKENS = True / prepare --item_tokens)")
    ids.append(piece)
  return np.asarray(ids, np.int64)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CooccurrenceInit:
  """`train(param_init_fn=...)`: item rows of ``token_embedder/embedding``.

  Attributes:
    dataset: prepared dataset key (read from the current data root).
    window: items at most this many positions apart co-occur.
    scale: std of the new rows relative to the rows they replace.
    seed: SVD seed.
  """
  dataset: str = "ml100k"
  window: int = 5
  scale: float = 1.0
  seed: int = 0

  def __call__(self, params: Dict[str, Any], model) -> Dict[str, Any]:
    from p5jax import evaluation  # pylint: disable=g-import-not-at-top
    catalog = evaluation.Catalog.load(self.dataset)
    if not catalog.items_as_tokens:
      raise ItemInitError(
          f"CooccurrenceInit: {self.dataset!r} was prepared without item tokens; "
          "prepare it with --item_tokens (ITEM_TOKENS = True) or drop param_init_fn")
    index = catalog.index
    train_parts = [[index[i] for i in items[:-2] if i in index]
                   for items in catalog.sequences.values()]
    table = params["token_embedder"]["embedding"]
    dim = table.shape[1]
    cooc = cooccurrence_matrix(train_parts, len(catalog.item_ids), self.window)
    vectors = spectral_item_vectors(cooc, dim, self.seed)
    ids = item_token_ids(catalog, model.input_vocabulary)
    host = np.asarray(jax.device_get(table)).copy()
    old_std = float(host[ids].std()) or 1.0
    new_std = float(vectors.std()) or 1.0
    host[ids] = (vectors * (self.scale * old_std / new_std)).astype(host.dtype)
    logging.info("CooccurrenceInit: %d item rows of %s from %d co-occurring pairs",
                 len(ids), self.dataset, cooc.nnz)
    new_table = jax.make_array_from_callback(host.shape, table.sharding,
                                             lambda idx: host[idx])
    # Same pytree type as given (FrozenDict or dict): the train state's
    # structure must not change.
    frozen = isinstance(params, frozen_dict.FrozenDict)
    out = frozen_dict.unfreeze(params) if frozen else dict(params)
    out["token_embedder"] = {**out["token_embedder"], "embedding": new_table}
    return frozen_dict.freeze(out) if frozen else out


def apply(param_init_fn: Optional[Any], params, model):
  """`param_init_fn(params, model)` or `params` unchanged."""
  return params if param_init_fn is None else param_init_fn(params, model)
