"""Invariants of the leak-free protocol (processing.py, indexing.py).

Runs on a generated fixture in ML-100K's GroupLens format; no TensorFlow.
"""
import collections
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fixtures  # pylint: disable=g-import-not-at-top

from p5jax.data import indexing
from p5jax.data import movielens
from p5jax.data import processing
from p5jax.data.errors import DataError
from p5jax.data.raw import Interaction, RawDataset


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  folder = fixtures.write_movielens_grouplens(
      tmp_path_factory.mktemp("ml") / "ml-100k", fixtures.make_world())
  return movielens.read(folder, allow_download=False)


@pytest.fixture(scope="module", params=indexing.METHODS)
def processed(request, raw):
  return processing.process(raw, processing.ProcessingConfig(
      indexing=request.param, num_clusters=3, max_cluster_size=30))


def _by_user(p):
  return {u["user_id"]: u for u in p.users}


def test_kcore_reaches_fixpoint():
  # Item "c" has 2 users; removing it drops user 3 below 2, which then drops
  # item "b" below 2: three rounds (the last one changes nothing).
  rows = [Interaction(u, i, 5.0, t, row=t) for t, (u, i) in enumerate(
      [("1", "a"), ("1", "b"), ("2", "a"), ("2", "b"), ("3", "b"), ("3", "c"),
       ("1", "d"), ("2", "d")])]
  kept, iters = processing.kcore_filter(rows, 2)
  users = collections.Counter(x.user for x in kept)
  items = collections.Counter(x.item for x in kept)
  assert min(users.values()) >= 2 and min(items.values()) >= 2
  assert {x.item for x in kept} == {"a", "b", "d"} and "3" not in users
  assert iters == 3


def test_chronological_ties_break_by_file_order():
  rows = [Interaction("u", "x", 1, 10, row=0), Interaction("u", "y", 1, 5, row=1),
          Interaction("u", "z", 1, 10, row=2), Interaction("u", "w", 1, 5, row=3)]
  assert [x.item for x in processing.chronological(rows)["u"]] == ["y", "w", "x", "z"]


def test_duplicates_keep_earliest():
  rows = [Interaction("u", "x", 1, 10, row=0), Interaction("u", "x", 4, 3, row=1)]
  kept, dropped = processing.dedupe(rows)
  assert dropped == 1 and kept[0].rating == 4


def test_sequences_are_chronological(processed, raw):
  id2item = {v: k for k, v in processed.item2id.items()}
  id2user = {v: k for k, v in processed.user2id.items()}
  order = {}
  for x in raw.interactions:
    order[(x.user, x.item)] = (x.timestamp, x.row)
  for u in processed.users:
    keys = [order[(id2user[int(u["user_id"])], id2item[int(i)])] for i in u["items"]]
    assert keys == sorted(keys)


def test_no_target_in_training_history_or_review_train(processed):
  review_train = {(r["user_id"], r["item_id"]) for r in processed.reviews
                  if r["split"] == "train"}
  for u in processed.users:
    items = u["items"]
    val_t, test_t = items[-2], items[-1]
    train_part = items[:-2]
    assert val_t not in train_part and test_t not in train_part
    assert test_t not in items[:-1]  # the test history
    assert (u["user_id"], val_t) not in review_train
    assert (u["user_id"], test_t) not in review_train


def test_candidates(processed):
  for u in processed.users:
    touched = set(u["items"])
    for split, target in (("validation", u["items"][-2]), ("test", u["items"][-1])):
      c = u["candidates"][split]
      assert len(c) == 100 and len(set(c)) == 100
      assert target in c
      assert not (set(c) - {target}) & touched
    negs = u["negatives"]
    assert len(negs) == 99 and not set(negs) & touched
    # Training negatives never reveal the test distractors.
    assert not set(negs) & set(u["candidates"]["test"])


def test_indexing_is_bijection(processed):
  for mapping in (processed.item2id, processed.user2id):
    assert sorted(mapping.values()) == list(range(1, len(mapping) + 1))
  seen = {i for u in processed.users for i in u["items"]}
  assert seen == {str(i) for i in processed.item2id.values()}


def test_review_split_fractions_and_coverage(processed):
  splits = collections.Counter(r["split"] for r in processed.reviews)
  n = len(processed.reviews)
  assert abs(splits["train"] / n - 0.8) < 0.01
  assert abs(splits["validation"] - splits["test"]) <= 1
  train = [r for r in processed.reviews if r["split"] == "train"]
  assert {r["user_id"] for r in train} == {u["user_id"] for u in processed.users}
  assert {r["item_id"] for r in train} == {str(i) for i in processed.item2id.values()}


def test_deterministic_and_seed_sensitive(raw):
  cfg = processing.ProcessingConfig(seed=3)
  a, b = processing.process(raw, cfg), processing.process(raw, cfg)
  assert a.users == b.users and a.reviews == b.reviews and a.item2id == b.item2id
  c = processing.process(raw, processing.ProcessingConfig(seed=4))
  assert c.item2id != a.item2id
  assert [u["candidates"] for u in c.users] != [u["candidates"] for u in a.users]


def test_samples_do_not_depend_on_indexing(raw):
  """Candidates, negatives and review splits are the same raw items under every
  indexing, so indexing methods are compared on one evaluation set."""
  def in_raw_ids(p):
    id2item = {str(v): k for k, v in p.item2id.items()}
    id2user = {str(v): k for k, v in p.user2id.items()}
    users = {id2user[u["user_id"]]: (
        [id2item[i] for i in u["items"]],
        {k: [id2item[i] for i in v] for k, v in u["candidates"].items()},
        [id2item[i] for i in u["negatives"]]) for u in p.users}
    splits = {(id2user[r["user_id"]], id2item[r["item_id"]]): r["split"]
              for r in p.reviews}
    return users, splits
  ref = in_raw_ids(processing.process(raw, processing.ProcessingConfig()))
  for method in ("sequential", "leaky"):
    p = processing.process(raw, processing.ProcessingConfig(indexing=method))
    assert in_raw_ids(p) == ref


def test_sequential_indexing_assigns_training_items_first(raw):
  p = processing.process(raw, processing.ProcessingConfig(indexing="sequential"))
  train_items = {int(i) for u in p.users for i in u["items"][:-2]}
  held_only = {int(i) for u in p.users for i in u["items"][-2:]} - train_items
  assert train_items == set(range(1, len(train_items) + 1))
  assert all(i > len(train_items) for i in held_only)
  # The leak this avoids: with P5's order the test item is often max(history)+1.
  def plus_one_rate(q):
    return sum(int(u["items"][-1]) == max(map(int, u["items"][:-1])) + 1
               for u in q.users) / len(q.users)
  leaky = processing.process(raw, processing.ProcessingConfig(indexing="leaky"))
  assert plus_one_rate(leaky) > 0.1
  assert plus_one_rate(p) < 0.02


def test_leaky_is_first_appearance(raw):
  p = processing.process(raw, processing.ProcessingConfig(indexing="leaky"))
  seen = 0
  for u in p.users:  # users numbered by first appearance, items likewise
    for i in map(int, u["items"]):
      assert i <= seen + 1
      seen = max(seen, i)


def test_collaborative_groups_co_occurring_items(raw):
  world = fixtures.make_world()
  p = processing.process(raw, processing.ProcessingConfig(
      indexing="collaborative", num_clusters=5, max_cluster_size=40))
  id2item = {v: k for k, v in p.item2id.items()}
  groups = [world.item_group[int(id2item[i])] for i in range(1, len(id2item) + 1)]
  # Fixture items come in 5 taste groups; contiguous ids should mostly share
  # a group (random order would give ~1/5).
  same = sum(a == b for a, b in zip(groups, groups[1:])) / (len(groups) - 1)
  assert same > 0.6


def test_explanations_derived_from_train_reviews():
  reviews = [
      {"item_id": "1", "split": "train", "review_text": "Nice. The soft fabric feels great here."},
      {"item_id": "1", "split": "train", "review_text": "The fabric is fine, says me."},
      {"item_id": "1", "split": "test", "review_text": "Soft soft soft soft. Ok."},
  ]
  processing.derive_explanations(reviews)
  assert reviews[0]["explanation"] == "The soft fabric feels great here."
  assert reviews[0]["feature"] == "fabric"  # in 2 train reviews vs "soft" in 1
  assert reviews[2]["explanation"] == "Soft soft soft soft."
  assert reviews[2]["feature"] == "soft"


def test_short_user_after_filtering_is_an_error(raw):
  with pytest.raises(DataError, match="leave-one-out needs >= 3"):
    processing.process(RawDataset("movielens", [
        Interaction("1", "a", 3, 0, row=0), Interaction("1", "b", 3, 1, row=1)]),
        processing.ProcessingConfig(kcore=0))


def test_everything_filtered_is_an_error(raw):
  with pytest.raises(DataError, match="no interactions survive"):
    processing.process(raw, processing.ProcessingConfig(kcore=1000))


def test_small_catalogue_is_an_error():
  rows = [Interaction(str(u), str(i), 3, i, row=u * 10 + i)
          for u in range(6) for i in range(6)]
  with pytest.raises(DataError, match="untouched items"):
    processing.process(RawDataset("movielens", rows), processing.ProcessingConfig())
