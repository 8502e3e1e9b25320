"""The leak-free protocol: dedupe, k-core, sequences, splits, candidates, text.

Input is a `RawDataset` (raw ids); output is a `Processed` bundle in P5 ids,
ready for `prepare` to write. Every random choice draws from a generator seeded
by (seed, purpose, user), so results do not depend on iteration order and two
runs with one seed are identical.

Protocol (see DESIGN.md):
* duplicate (user, item) events: the earliest is kept, the rest counted;
* k-core: users and items with < k distinct partners are removed, repeatedly,
  until nothing changes;
* per-user chronological order by (timestamp, original row): ties in coarse
  timestamps (ML-100K has many) break by file order, deterministically;
* leave-one-out: items[-1] test target, items[-2] validation target, the rest
  training; a test history is items[:-1], never containing its target;
* candidates (validation, test): the target + 99 items the user never touched,
  shuffled, stored. `negatives`: 99 more never-touched items for training the
  direct family, disjoint from that user's validation/test candidates whenever
  enough items exist (else disjoint from the test candidates at least);
* reviews: 80/10/10 split; every user and item gets a training review when it
  has one that is allowed there; the (user, item) pairs that are sequential
  validation/test targets are always held out of review training;
* explanation / feature when the source has none: explanation = the first
  sentence of the review with >= 4 words; feature = the word of that sentence
  (lower-cased, alphabetic, >= 3 letters, not a stopword) that occurs in the
  most *training* reviews of the same item (ties: alphabetical).
"""
import collections
import dataclasses
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from p5jax.data import indexing as indexing_lib
from p5jax.data.errors import DataError
from p5jax.data.raw import Interaction, RawDataset

_PURPOSE = {"val": 1, "test": 2, "neg": 3, "review": 4}


@dataclasses.dataclass(frozen=True)
class ProcessingConfig:
  kcore: int = 5
  seed: int = 0
  indexing: str = "random"
  num_candidates: int = 100       # target + (num_candidates - 1) negatives
  num_negatives: int = 99
  review_fractions: Tuple[float, float, float] = (0.8, 0.1, 0.1)
  num_clusters: int = 10          # collaborative indexing
  max_cluster_size: int = 100
  item_tokens: bool = False       # vocabulary + prompt form only (schema.py)


@dataclasses.dataclass
class Processed:
  user2id: Dict[str, int]
  item2id: Dict[str, int]
  users: List[dict]      # sequential.jsonl records, ordered by user id
  reviews: List[dict]    # reviews.jsonl records, ordered by (user, time)
  stats: Dict[str, object]


def dedupe(rows: List[Interaction]) -> Tuple[List[Interaction], int]:
  best: Dict[Tuple[str, str], Interaction] = {}
  for x in rows:
    k = (x.user, x.item)
    if k not in best or (x.timestamp, x.row) < (best[k].timestamp, best[k].row):
      best[k] = x
  kept = sorted(best.values(), key=lambda x: x.row)
  return kept, len(rows) - len(kept)


def kcore_filter(rows: List[Interaction], k: int) -> Tuple[List[Interaction], int]:
  """Iterates the k-core filter to its fixpoint; returns (rows, iterations)."""
  it = 0
  while True:
    it += 1
    users = collections.Counter(x.user for x in rows)
    items = collections.Counter(x.item for x in rows)
    kept = [x for x in rows if users[x.user] >= k and items[x.item] >= k]
    if len(kept) == len(rows):
      return kept, it
    rows = kept


def chronological(rows: List[Interaction]) -> Dict[str, List[Interaction]]:
  """user -> events sorted by (timestamp, row); users in first-appearance order."""
  seqs: Dict[str, List[Interaction]] = {}
  for x in rows:
    seqs.setdefault(x.user, []).append(x)
  for s in seqs.values():
    s.sort(key=lambda x: (x.timestamp, x.row))
  return seqs


def _rng(seed: int, purpose: str, user_index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _PURPOSE[purpose], user_index])


def _sample_untouched(rng, num_items: int, excluded: set, n: int) -> List[int]:
  """n distinct ids from 1..num_items not in `excluded` (rejection sampling)."""
  if num_items - len(excluded) < n:
    raise ValueError
  out, seen = [], set(excluded)
  while len(out) < n:
    for j in rng.integers(1, num_items + 1, size=2 * (n - len(out)) + 8):
      j = int(j)
      if j not in seen:
        seen.add(j)
        out.append(j)
        if len(out) == n:
          break
  return out


_SENT = re.compile(r"[^.!?\n]+[.!?]?")
_WORD = re.compile(r"[a-z]+")
STOPWORDS = frozenset("""a about above after again against all also am an and any
are as at be because been before being below between both but by can could did do
does doing down during each even ever every few for from further get got had has
have having he her here hers herself him himself his how i if in into is it its
itself just like make made many me more most much must my myself no nor not now of
off on once one only or other our ours ourselves out over own really same she
should so some such than that the their theirs them themselves then there these
they this those through to too under until up use used using very was way we well
were what when where which while who whom why will with would you your yours
yourself yourselves""".split())


def first_sentence(text: str, min_words: int = 4) -> str:
  for m in _SENT.finditer(text or ""):
    s = " ".join(m.group(0).split())
    if len(s.split()) >= min_words:
      return s
  return ""


def candidate_words(sentence: str) -> List[str]:
  return sorted({w for w in _WORD.findall(sentence.lower())
                 if len(w) >= 3 and w not in STOPWORDS})


def derive_explanations(reviews: List[dict]) -> None:
  """Fills `explanation`/`feature` in place (see module docstring)."""
  for r in reviews:
    r["explanation"] = first_sentence(r["review_text"])
  doc_freq: Dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter)
  for r in reviews:
    if r["split"] == "train":  # statistics from training reviews only
      doc_freq[r["item_id"]].update(set(_WORD.findall(r["review_text"].lower())))
  for r in reviews:
    words = candidate_words(r["explanation"])
    df = doc_freq.get(r["item_id"], collections.Counter())
    r["feature"] = min(words, key=lambda w: (-df[w], w)) if words else ""


def _fixed_negatives(raw_negs: Optional[List[str]], item2id: Dict[str, int],
                     touched: set, need: int, raw_user: str) -> List[int]:
  """Validates a source's fixed test negatives (the P5 release ships them)."""
  where = dict(path="negative_samples.txt", field="negatives")
  if raw_negs is None:
    raise DataError(f"no negative samples for user {raw_user!r}", **where)
  missing = [i for i in raw_negs if i not in item2id]
  if missing:
    raise DataError(f"user {raw_user!r}: negatives {missing[:5]} are not items "
                    "of the filtered dataset", **where)
  negs = [item2id[i] for i in raw_negs]
  if len(set(negs)) != need or set(negs) & touched:
    raise DataError(f"user {raw_user!r}: need {need} distinct untouched "
                    f"negatives, got {len(set(negs) - touched)}", **where)
  return negs


def _negatives(rng, num_items: int, touched: set, cands: Dict[str, List[int]],
               n: int, raw_user: str) -> List[int]:
  """n never-touched items, kept out of the user's held-out candidate lists.

  Preference: disjoint from validation and test candidates; else from test
  candidates only; on a catalogue too small even for that, the untouched
  non-test items are repeated (training on a test candidate as a "no" would
  leak which items are the distractors).
  """
  test = set(cands["test"])
  for avoid in (touched | test | set(cands["validation"]), touched | test):
    if num_items - len(avoid) >= n:
      return _sample_untouched(rng, num_items, avoid, n)
  pool = sorted(set(range(1, num_items + 1)) - touched - test)
  if not pool:
    raise DataError(f"user {raw_user!r}: no item is left for negatives",
                    field="user")
  pool = [pool[j] for j in rng.permutation(len(pool))]
  return [pool[j % len(pool)] for j in range(n)]


def _split_reviews(seqs: Dict[str, List[str]], config: ProcessingConfig
                   ) -> Dict[Tuple[str, str], str]:
  """(raw user, raw item) -> split, per the protocol in the module docstring.

  `seqs` (raw user -> chronological raw items) must be in canonical user order.
  """
  pairs = [(u, i) for u, s in seqs.items() for i in s]
  held = {(u, s[-1]) for u, s in seqs.items()} | {(u, s[-2]) for u, s in seqs.items()}
  rng = np.random.default_rng([config.seed, _PURPOSE["review"]])
  order = [pairs[j] for j in rng.permutation(len(pairs))]
  # Coverage: the first allowed pair (in shuffled order) per user and per item.
  required, has_user, has_item = set(), set(), set()
  for p in order:
    if p in held:
      continue
    if p[0] not in has_user or p[1] not in has_item:
      required.add(p)
      has_user.add(p[0])
      has_item.add(p[1])
  f_train, f_val, _ = config.review_fractions
  n = len(pairs)
  n_holdout = max(n - round(f_train * n), len(held))
  holdout = [p for p in order if p in held]
  for p in order:
    if len(holdout) >= n_holdout:
      break
    if p not in held and p not in required:
      holdout.append(p)
  # Shuffle again so val/test each get a mix of forced and sampled pairs.
  holdout = [holdout[j] for j in rng.permutation(len(holdout))]
  n_val = round(len(holdout) * f_val / max(1e-9, 1.0 - f_train))
  split = {p: "train" for p in pairs}
  for j, p in enumerate(holdout):
    split[p] = "validation" if j < n_val else "test"
  return split


def process(raw: RawDataset, config: ProcessingConfig) -> Processed:
  """Runs the whole protocol on `raw`."""
  if config.kcore < 0:
    raise DataError(f"kcore must be >= 0, got {config.kcore}", field="kcore")
  if not raw.interactions:
    raise DataError("dataset has no interactions")
  rows, n_dup = dedupe(raw.interactions)
  rows, kcore_iters = kcore_filter(rows, config.kcore)
  if not rows:
    raise DataError(f"no interactions survive the {config.kcore}-core filter",
                    field="kcore")
  seqs = chronological(rows)
  for u, s in seqs.items():
    if len(s) < 3:  # leave-one-out needs train + validation + test
      raise DataError(
          f"user {u!r} has {len(s)} interaction(s) after {config.kcore}-core "
          "filtering; leave-one-out needs >= 3 (raise --kcore)", field="user")
  raw_seqs = {u: [x.item for x in s] for u, s in seqs.items()}
  user2id = indexing_lib.index_users(raw_seqs, config.indexing)
  item2id = indexing_lib.index_items(raw_seqs, indexing_lib.IndexingConfig(
      config.indexing, config.seed, config.num_clusters, config.max_cluster_size))
  num_items = len(item2id)
  need = config.num_candidates - 1
  seqs_p5 = {user2id[u]: [(item2id[x.item], x) for x in s] for u, s in seqs.items()}
  # Sampling happens in a canonical numbering (raw ids in natural order), so
  # every indexing method gets the same candidates, negatives and splits.
  canon_items = sorted(item2id, key=indexing_lib.natural_key)
  canon_of = {r: k + 1 for k, r in enumerate(canon_items)}
  p5_of = [0] + [item2id[r] for r in canon_items]
  canon_user = {r: k for k, r in enumerate(sorted(seqs, key=indexing_lib.natural_key))}

  users = []
  for u in sorted(seqs_p5):
    s = seqs_p5[u]
    raw_user = s[0][1].user
    cu = canon_user[raw_user]
    items_c = [canon_of[x.item] for _, x in s]
    touched = set(items_c)
    if num_items - len(touched) < need:
      raise DataError(
          f"user {raw_user!r} touched {len(touched)} of {num_items} items: fewer "
          f"than {need} untouched items are left to sample candidates from",
          field="user")
    cands = {}
    for split, target, purpose in (("validation", items_c[-2], "val"),
                                   ("test", items_c[-1], "test")):
      rng = _rng(config.seed, purpose, cu)
      if split == "test" and raw.fixed_negatives is not None:
        negs = _fixed_negatives(raw.fixed_negatives.get(raw_user), canon_of,
                                touched, need, raw_user)
      else:
        negs = _sample_untouched(rng, num_items, touched, need)
      c = [target] + negs
      cands[split] = [c[j] for j in rng.permutation(len(c))]
    negatives = _negatives(_rng(config.seed, "neg", cu), num_items, touched,
                           cands, config.num_negatives, raw_user)
    users.append({
        "user_id": str(u),
        "user_name": raw.user_names.get(raw_user, ""),
        "items": [str(i) for i, _ in s],
        "timestamps": [int(x.timestamp) for _, x in s],
        "candidates": {k: [str(p5_of[i]) for i in v] for k, v in cands.items()},
        "negatives": [str(p5_of[i]) for i in negatives],
    })

  split = _split_reviews(
      {r: [x.item for x in seqs[r]] for r in canon_user}, config)
  id2item = {v: k for k, v in item2id.items()}
  reviews = []
  for u in sorted(seqs_p5):
    for i, x in seqs_p5[u]:
      reviews.append({
          "user_id": str(u), "item_id": str(i),
          "user_name": raw.user_names.get(x.user, ""),
          "item_title": raw.item_titles.get(id2item[i], ""),
          "rating": float(x.rating), "timestamp": int(x.timestamp),
          "review_text": x.review_text, "summary": x.summary,
          "explanation": x.explanation, "feature": x.feature,
          "split": split[(x.user, x.item)],
      })
  if any(x.review_text for x in rows) and not raw.has_explanations:
    derive_explanations(reviews)

  counts = collections.Counter(r["split"] for r in reviews)
  train_items = {r["item_id"] for r in reviews if r["split"] == "train"}
  train_users = {r["user_id"] for r in reviews if r["split"] == "train"}
  lengths = [len(x["items"]) for x in users]
  stats = {
      "users": len(user2id), "items": num_items, "interactions": len(rows),
      "raw_interactions": len(raw.interactions), "duplicates_dropped": n_dup,
      "kcore": config.kcore, "kcore_iterations": kcore_iters,
      "density": round(len(rows) / (len(user2id) * num_items), 6),
      "avg_sequence_length": round(float(np.mean(lengths)), 3),
      "max_sequence_length": int(max(lengths)),
      "reviews": {s: counts.get(s, 0) for s in ("train", "validation", "test")},
      "reviews_with_text": sum(1 for r in reviews if r["review_text"]),
      "reviews_with_explanation": sum(1 for r in reviews if r["explanation"]),
      "items_without_train_review": num_items - len(train_items),
      "users_without_train_review": len(user2id) - len(train_users),
  }
  return Processed(user2id, item2id, users, reviews, stats)
