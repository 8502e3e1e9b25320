"""Raw readers on generated fixtures in each real format, and bad input."""
import gzip
import json
import os
import pickle
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fixtures  # pylint: disable=g-import-not-at-top

from p5jax.data import amazon
from p5jax.data import movielens
from p5jax.data import p5_release
from p5jax.data import yelp
from p5jax.data.errors import ChecksumError, DataError


@pytest.fixture(scope="module")
def world():
  return fixtures.make_world(num_users=20, num_items=130, min_len=8, max_len=12)


def _pairs(raw):
  return sorted((x.user, x.item, x.rating, x.timestamp) for x in raw.interactions)


def test_movielens_grouplens_and_recbole_agree(tmp_path, world):
  a = movielens.read(fixtures.write_movielens_grouplens(tmp_path / "g", world),
                     allow_download=False)
  b = movielens.read(fixtures.write_movielens_recbole(tmp_path / "r", world),
                     allow_download=False)
  assert a.provenance["raw_layout"] == "grouplens"
  assert b.provenance["raw_layout"] == "recbole"
  assert _pairs(a) == _pairs(b) and len(a.interactions) == len(world.events)
  assert a.item_titles == b.item_titles
  assert a.item_titles["3"] == world.titles[3] + " (1995)"
  assert a.item_meta["3"]["genres"] == b.item_meta["3"]["genres"] != []
  assert not a.provenance["matches_official_ml100k"]
  assert set(a.raw_files) == {"u.data", "u.item", "u.user"}


def test_movielens_subfolder_and_missing(tmp_path, world):
  fixtures.write_movielens_recbole(tmp_path / "ml-100k", world)
  folder, layout, user_given = movielens.ensure_raw(str(tmp_path))
  assert folder.endswith("ml-100k") and layout == "recbole" and user_given
  with pytest.raises(DataError, match="no MovieLens-100K files"):
    movielens.ensure_raw(str(tmp_path / "empty"))


def test_movielens_cache_checksum_mismatch(tmp_path, monkeypatch, world):
  monkeypatch.setenv("P5JAX_CACHE_DIR", str(tmp_path))
  fixtures.write_movielens_recbole(tmp_path / "raw" / "ml-100k", world)
  with pytest.raises(ChecksumError) as e:
    movielens.ensure_raw(None, allow_download=False)
  msg = str(e.value)
  assert "ml-100k.inter" in msg and movielens.RECBOLE_SHA256["ml-100k.inter"] in msg
  assert e.value.actual in msg and e.value.actual != e.value.expected


def test_amazon(tmp_path, world):
  raw = amazon.read(fixtures.write_amazon(tmp_path, world, "Beauty"), "Beauty")
  assert len(raw.interactions) == len(world.events)
  x = raw.interactions[0]
  e = world.events[0]
  assert (x.user, x.item, x.rating, x.timestamp) == (
      fixtures.reviewer(e.user), fixtures.asin(e.item), e.rating, e.timestamp)
  assert x.review_text == e.review and x.summary == e.summary
  assert raw.user_names[fixtures.reviewer(1)] == "Reviewer1"
  assert raw.item_titles[fixtures.asin(5)] == world.titles[5]
  assert raw.item_meta[fixtures.asin(5)]["categories"][0] == "Beauty"


def test_amazon_meta_is_never_evaluated(tmp_path, world):
  folder = fixtures.write_amazon(tmp_path, world, "Beauty")
  marker = tmp_path / "pwned"
  with gzip.open(os.path.join(folder, "meta_Beauty.json.gz"), "at") as f:
    f.write(f"__import__('os').system('touch {marker}')\n")
  with pytest.raises(DataError) as e:
    amazon.read(folder, "Beauty")
  assert "meta_Beauty.json.gz" in str(e.value) and f"line {130 + 1}" in str(e.value)
  assert not marker.exists()


def test_yelp(tmp_path, world):
  raw = yelp.read(fixtures.write_yelp(tmp_path, world))
  assert len(raw.interactions) == len(world.events)
  e, x = world.events[3], raw.interactions[3]
  assert x.timestamp == e.timestamp and x.rating == e.rating
  assert x.review_text == e.review and x.summary == ""
  assert raw.item_titles[x.item] == world.titles[e.item]
  assert raw.user_names[x.user] == world.user_names[e.user]


@pytest.fixture(scope="module")
def big_world():
  return fixtures.make_world()  # survives 5-core with >= 99 negatives per user


def test_p5_release(tmp_path, big_world):
  world = big_world
  folder = fixtures.write_p5_release(tmp_path, world)
  raw = p5_release.read(folder)
  cored = fixtures.kcore(world)
  assert len(raw.interactions) == len(cored.events)
  seqs = fixtures.chronological(cored)
  got = {}
  for x in raw.interactions:
    got.setdefault(x.user, []).append(x.item)
  assert got == {fixtures.reviewer(u): [fixtures.asin(e.item) for e in s]
                 for u, s in seqs.items()}
  assert len(raw.interactions) > 500
  assert raw.has_explanations and all(x.explanation for x in raw.interactions)
  assert all(len(v) == 99 for v in raw.fixed_negatives.values())
  assert raw.user_names[fixtures.reviewer(2)] == "Reviewer2"


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [
    {"train": [_Evil()]},
    {"train": [{"s": {1, 2}}]},   # protocol 2 pickles sets via builtins.set
])
def test_restricted_unpickler_refuses_non_plain(tmp_path, payload):
  path = tmp_path / "review_splits.pkl"
  path.write_bytes(pickle.dumps(payload, protocol=2))
  with pytest.raises(DataError, match=r"refusing to unpickle .*only plain") as e:
    p5_release.load_plain_pickle(str(path))
  assert "review_splits.pkl" in str(e.value)


def test_restricted_unpickler_loads_plain(tmp_path):
  obj = {"train": [{"a": 1, "b": 2.5, "c": "x", "d": [None, True], "e": (1,),
                    "f": "\u00e9"}], "n": -3}
  for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
    path = tmp_path / f"p{proto}.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=proto))
    assert p5_release.load_plain_pickle(str(path)) == obj


def _replace_line(path, n, new):
  lines = open(path).read().split("\n")
  lines[n - 1] = new
  open(path, "w").write("\n".join(lines))


@pytest.mark.parametrize("line,field", [
    ("1\t2\t3", "<row>"),                   # wrong column count
    ("1\t2\tfive\t881250949", "rating"),    # non-numeric rating
    ("1\t2\t3\tyesterday", "timestamp"),    # non-numeric timestamp
    ("1\t9999\t3\t881250949", "item_id"),   # unknown item
])
def test_movielens_bad_rows_name_file_line_field(tmp_path, world, line, field):
  folder = fixtures.write_movielens_grouplens(tmp_path, world)
  _replace_line(os.path.join(folder, "u.data"), 7, line)
  with pytest.raises(DataError) as e:
    movielens.read(folder, allow_download=False)
  err = e.value
  assert (os.path.basename(err.path), err.line, err.field) == ("u.data", 7, field)
  assert "u.data" in str(err) and "line 7" in str(err) and repr(field) in str(err)


def test_recbole_bad_row(tmp_path, world):
  folder = fixtures.write_movielens_recbole(tmp_path, world)
  _replace_line(os.path.join(folder, "ml-100k.inter"), 4, "1\t2\t3.5x\t881250949")
  with pytest.raises(DataError, match=r"ml-100k.inter, line 4, field 'rating'"):
    movielens.read(folder, allow_download=False)


def test_amazon_bad_json_and_field(tmp_path, world):
  folder = fixtures.write_amazon(tmp_path, world, "Beauty")
  path = os.path.join(folder, "reviews_Beauty_5.json.gz")
  lines = gzip.open(path, "rt").read().split("\n")
  good = lines[4]
  for bad, field in (("{\"reviewerID\": \"A1\", ", "<json>"),
                     (good.replace('"overall": ', '"overall": "x'), None),
                     (json.dumps(dict(json.loads(good), unixReviewTime="soon")),
                      "unixReviewTime")):
    lines[4] = bad
    with gzip.open(path, "wt") as f:
      f.write("\n".join(lines))
    with pytest.raises(DataError) as e:
      amazon.read(folder, "Beauty")
    assert e.value.line == 5 and "reviews_Beauty_5.json.gz" in str(e.value)
    if field:
      assert e.value.field == field


def test_yelp_unknown_business(tmp_path, world):
  folder = fixtures.write_yelp(tmp_path, world)
  path = os.path.join(folder, "review.json")
  lines = open(path).read().split("\n")
  lines[2] = json.dumps(dict(json.loads(lines[2]), business_id="nope"))
  open(path, "w").write("\n".join(lines))
  with pytest.raises(DataError, match=r"review.json, line 3, field 'business_id'"):
    yelp.read(folder)


def test_p5_release_unknown_ids_and_empty_user(tmp_path, big_world):
  world = big_world
  folder = fixtures.write_p5_release(tmp_path, world)
  neg = os.path.join(folder, "negative_samples.txt")
  _replace_line(neg, 2, "99999 1 2 3")
  with pytest.raises(DataError, match=r"negative_samples.txt, line 2, field 'user'"):
    p5_release.read(folder)
  folder = fixtures.write_p5_release(tmp_path / "b", world)
  seq = os.path.join(folder, "sequential_data.txt")
  _replace_line(seq, 3, "3")
  with pytest.raises(DataError, match=r"sequential_data.txt, line 3, field 'items'"):
    p5_release.read(folder)
  folder = fixtures.write_p5_release(tmp_path / "c", world)
  seq = os.path.join(folder, "sequential_data.txt")
  _replace_line(seq, 1, "1 2 77777")
  with pytest.raises(DataError, match=r"line 1, field 'item\[2\]'"):
    p5_release.read(folder)
