"""Item (and user) indexing: raw ids -> P5 ids "1".."N".

How items are numbered matters because P5 writes ids as text and the model
reads their sub-tokens. Methods:

* ``random`` (default): a seeded permutation; ids carry no information.
* ``sequential``: items numbered in order of appearance, but over the
  *training* parts of the sequences first (all users' ``items[:-2]``), then the
  validation targets, then the test targets. Similar items get nearby ids
  without revealing held-out items.
* ``collaborative``: recursive spectral clustering of the item co-occurrence
  graph built from training parts only (scikit-learn); each cluster's items get
  contiguous ids, so ids share leading digits within a cluster (a simple form of
  P5's collaborative indexing, CID).
* ``leaky``: P5's original first-appearance order over whole sequences,
  validation and test items included. LEAKY: a user's test item is often the
  largest id seen so far + 1, which a model can learn. Only for reproducing the
  original numbers.

Users are numbered 1..U in raw-id order (first-appearance order for ``leaky``).
Every mapping is a bijection onto "1".."N"; `check_bijection` enforces it.
"""
import dataclasses
import warnings
from typing import Dict, List, Sequence

import numpy as np

from p5jax.data.errors import DataError

METHODS = ("random", "sequential", "collaborative", "leaky")


@dataclasses.dataclass(frozen=True)
class IndexingConfig:
  method: str = "random"
  seed: int = 0
  # collaborative: clusters per level, and the largest cluster left unsplit.
  num_clusters: int = 10
  max_cluster_size: int = 100


def natural_key(raw: str):
  """Numeric ids sort numerically ("2" < "10"), others lexically after them."""
  return (0, int(raw), "") if raw.isdigit() else (1, 0, raw)


def index_users(sequences: Dict[str, List[str]], method: str) -> Dict[str, int]:
  users = list(sequences) if method == "leaky" else sorted(sequences, key=natural_key)
  return {u: i + 1 for i, u in enumerate(users)}


def index_items(sequences: Dict[str, List[str]], config: IndexingConfig
                ) -> Dict[str, int]:
  """Maps raw item ids to 1..N.

  Args:
    sequences: raw user -> chronological raw items (>= 3 each), users in
      first-appearance order. Last item = test target, second-to-last =
      validation target, the rest = training part.
    config: method and its options.
  """
  if config.method not in METHODS:
    raise DataError(f"unknown indexing {config.method!r}; choose from {METHODS}",
                    field="indexing")
  all_items = sorted({i for s in sequences.values() for i in s}, key=natural_key)
  if config.method == "random":
    order = [all_items[j] for j in np.random.default_rng(config.seed).permutation(
        len(all_items))]
  elif config.method == "leaky":
    order = _first_appearance(s for s in sequences.values())
  elif config.method == "sequential":
    users = sorted(sequences, key=natural_key)
    order = _first_appearance(
        [sequences[u][:-2] for u in users] + [[sequences[u][-2]] for u in users] +
        [[sequences[u][-1]] for u in users])
  else:
    order = _collaborative_order(sequences, all_items, config)
  mapping = {item: k + 1 for k, item in enumerate(order)}
  check_bijection(mapping, all_items)
  return mapping


def check_bijection(mapping: Dict[str, int], keys: Sequence[str]) -> None:
  ids = sorted(mapping.values())
  if set(mapping) != set(keys) or ids != list(range(1, len(keys) + 1)):
    raise AssertionError("indexing is not a bijection onto 1..N")


def _first_appearance(seqs) -> List[str]:
  seen, order = set(), []
  for s in seqs:
    for i in s:
      if i not in seen:
        seen.add(i)
        order.append(i)
  return order


def _collaborative_order(sequences, all_items, config: IndexingConfig) -> List[str]:
  import scipy.sparse as sp  # pylint: disable=g-import-not-at-top
  pos = {i: k for k, i in enumerate(all_items)}
  rows, cols = [], []
  for u, (s) in enumerate(sequences.values()):
    for i in set(s[:-2]):  # training parts only: held-out items stay unseen
      rows.append(u)
      cols.append(pos[i])
  x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                    shape=(len(sequences), len(all_items)))
  co = (x.T @ x).tocsr()
  co.setdiag(0)
  co.eliminate_zeros()
  degree = np.asarray(co.sum(axis=1)).ravel()
  connected = np.flatnonzero(degree > 0)
  # Items with no training co-occurrence cannot be clustered: they go last.
  isolated = np.flatnonzero(degree == 0)
  order = _cluster(co, connected, config, depth=0)
  return [all_items[k] for k in list(order) + list(isolated)]


def _cluster(co, idx: np.ndarray, config: IndexingConfig, depth: int) -> List[int]:
  """Depth-first order of `idx` after recursive spectral clustering."""
  if len(idx) <= config.max_cluster_size:
    return list(idx)
  from sklearn.cluster import SpectralClustering  # pylint: disable=g-import-not-at-top
  k = min(config.num_clusters, len(idx) // 2)
  sub = co[idx][:, idx]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "graph is not fully connected" is fine here
    labels = SpectralClustering(
        n_clusters=k, affinity="precomputed", assign_labels="discretize",
        random_state=config.seed + depth).fit_predict(sub)
  groups = [idx[labels == c] for c in range(k)]
  groups = [g for g in groups if len(g)]
  if len(groups) < 2:  # degenerate cut: split evenly so recursion terminates
    groups = np.array_split(idx, 2)
  # Larger clusters first, ties by smallest member: deterministic order.
  groups.sort(key=lambda g: (-len(g), int(g.min())))
  out = []
  for g in groups:
    out.extend(_cluster(co, g, config, depth + 1))
  return out
