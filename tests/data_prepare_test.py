"""prepare(): layout, manifest, atomic writes, CLI, TFDS + SeqIO loading."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fixtures  # pylint: disable=g-import-not-at-top

from p5jax.data import movielens
from p5jax.data import prepare
from p5jax.data import schema
from p5jax.data.errors import DataError
from p5jax.data.raw import sha256_file

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def amazon_root(tmp_path_factory):
  """One TFDS-built fixture for the whole module (TFDS builds take seconds)."""
  return fixtures.prepared_root(tmp_path_factory.mktemp("amazon"), "amazon")


@pytest.fixture(scope="module")
def ml_raw(tmp_path_factory):
  return fixtures.write_movielens_grouplens(
      tmp_path_factory.mktemp("ml") / "raw", fixtures.make_world())


def test_layout_and_manifest(amazon_root):
  folder = schema.dataset_dir("amazon_beauty", amazon_root)
  manifest = json.load(open(os.path.join(folder, "manifest.json")))
  assert sorted(os.listdir(amazon_root)) == ["amazon_beauty", "tfds"]  # no temp
  assert set(manifest["files"]) == {"datamaps.json", "sequential.jsonl",
                                    "reviews.jsonl", "corpus.txt", "spiece.model"}
  for name, digest in manifest["files"].items():
    assert sha256_file(os.path.join(folder, name)) == digest
  assert manifest["dataset"] == "amazon_beauty" and manifest["source"] == "amazon"
  assert set(manifest["raw_files"]) == {"reviews_Beauty_5.json.gz",
                                        "meta_Beauty.json.gz"}
  users = _jsonl(os.path.join(folder, "sequential.jsonl"))
  reviews = _jsonl(os.path.join(folder, "reviews.jsonl"))
  assert manifest["counts"]["users"] == len(users)
  assert manifest["counts"]["interactions"] == len(reviews)
  maps = json.load(open(os.path.join(folder, "datamaps.json")))
  assert len(maps["item2id"]) == manifest["counts"]["items"] == len(maps["id2item"])
  assert maps["item_titles"]["1"].startswith("Thing ")
  assert all(r["explanation"] and r["feature"] in r["explanation"].lower()
             for r in reviews)


def test_corpus(amazon_root):
  folder = schema.dataset_dir("amazon_beauty", amazon_root)
  lines = open(os.path.join(folder, "corpus.txt"), encoding="utf-8").read().split("\n")
  lines = [l for l in lines if l]
  assert len(lines) == len(set(lines))
  assert "Reviewer1" in lines and "Brand0" in lines
  assert any(l.startswith("Thing ") for l in lines)
  reviews = _jsonl(os.path.join(folder, "reviews.jsonl"))
  train_text = {r["review_text"] for r in reviews if r["split"] == "train"}
  held_only = {r["review_text"] for r in reviews if r["split"] != "train"} - train_text
  assert train_text <= set(lines) and not held_only & set(lines)


def test_tfds_loads_through_seqio_in_fresh_process(amazon_root):
  folder = schema.dataset_dir("amazon_beauty", amazon_root)
  users = {u["user_id"]: u for u in _jsonl(os.path.join(folder, "sequential.jsonl"))}
  reviews = _jsonl(os.path.join(folder, "reviews.jsonl"))
  script = f"""
import json, seqio
import p5jax.data.tfds_builder
from p5jax.data import schema
out = {{}}
for cfg in ("sequential", "reviews"):
  src = seqio.TfdsDataSource(tfds_name=schema.tfds_name("amazon_beauty", cfg),
                             tfds_data_dir=schema.tfds_dir({amazon_root!r}))
  out[cfg] = {{s: src.num_input_examples(s) for s in schema.SPLITS}}
  ex = next(iter(src.get_dataset("test", shuffle=False).as_numpy_iterator()))
  out[cfg + "_test0"] = {{k: (v.decode() if isinstance(v, bytes) else
      [x.decode() for x in v] if hasattr(v, "ndim") and v.ndim else
      v.item() if hasattr(v, "item") else v) for k, v in ex.items()}}
print("RESULT" + json.dumps(out))
"""
  env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  n = len(users)
  assert out["sequential"] == {"train": n, "validation": n, "test": n}
  for s in schema.SPLITS:
    assert out["reviews"][s] == sum(r["split"] == s for r in reviews)
  ex = out["sequential_test0"]
  u = users[ex["user_id"]]
  assert ex["history"] == u["items"][:-1] and ex["target"] == u["items"][-1]
  assert ex["candidates"] == u["candidates"]["test"]
  assert ex["negatives"] == u["negatives"]
  assert ex["target"] not in ex["history"]
  r = out["reviews_test0"]
  assert r["user_id"] and r["item_title"].startswith("Thing ")


def test_tfds_validation_and_train_examples(amazon_root):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from p5jax.data import tfds_builder  # pylint: disable=g-import-not-at-top,unused-import
  folder = schema.dataset_dir("amazon_beauty", amazon_root)
  users = {u["user_id"]: u for u in _jsonl(os.path.join(folder, "sequential.jsonl"))}
  builder = tfds.builder(schema.tfds_name("amazon_beauty", "sequential"),
                         data_dir=schema.tfds_dir(amazon_root))
  for split, hist, target in (("train", slice(None, -2), None),
                              ("validation", slice(None, -2), -2)):
    for ex in tfds.as_numpy(builder.as_dataset(split=split).take(3)):
      u = users[ex["user_id"].decode()]
      assert [x.decode() for x in ex["history"]] == u["items"][hist]
      if target is None:
        assert ex["target"] == b"" and len(ex["candidates"]) == 0
      else:
        assert ex["target"].decode() == u["items"][target]
        assert len(ex["candidates"]) == 100


def test_deterministic_files(tmp_path, ml_raw):
  digests = []
  for k in range(2):
    prepare.prepare("ml-100k", tmp_path / str(k), raw_dir=ml_raw, seed=7,
                    build_tfds=False, allow_download=False)
    m = json.load(open(tmp_path / str(k) / "ml100k" / "manifest.json"))
    digests.append(m["files"])
  assert digests[0] == digests[1]
  prepare.prepare("ml-100k", tmp_path / "2", raw_dir=ml_raw, seed=8,
                  build_tfds=False, allow_download=False)
  m = json.load(open(tmp_path / "2" / "ml100k" / "manifest.json"))
  assert m["files"]["sequential.jsonl"] != digests[0]["sequential.jsonl"]


def test_failed_prepare_leaves_out_dir_untouched(tmp_path, ml_raw, monkeypatch):
  out = tmp_path / "out"
  prepare.prepare("ml-100k", out, raw_dir=ml_raw, build_tfds=False,
                  allow_download=False)
  before = open(out / "ml100k" / "manifest.json").read()
  from p5jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

  def boom(*args, **kwargs):
    raise RuntimeError("disk full")
  monkeypatch.setattr(tfds_builder, "build", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    prepare.prepare("ml-100k", out, raw_dir=ml_raw, seed=5, allow_download=False)
  assert sorted(os.listdir(out)) == ["ml100k"]
  assert open(out / "ml100k" / "manifest.json").read() == before
  # Bad input fails before anything is written.
  with pytest.raises(DataError):
    prepare.prepare("amazon", tmp_path / "fresh", raw_dir=str(tmp_path / "none"),
                    category="Beauty")
  assert not os.path.exists(tmp_path / "fresh") or not os.listdir(tmp_path / "fresh")


def test_commit_rolls_back_when_second_rename_fails(tmp_path, ml_raw, monkeypatch):
  out = tmp_path / "out"
  prepare.prepare("ml-100k", out, raw_dir=ml_raw, build_tfds=False,
                  allow_download=False)
  (out / "tfds" / "p5_ml100k").mkdir(parents=True)
  (out / "tfds" / "p5_ml100k" / "old").write_text("x")
  before = open(out / "ml100k" / "manifest.json").read()
  real_rename, calls = os.rename, []

  def flaky_rename(src, dst):
    calls.append(dst)
    new_build = os.path.join("tfds", "p5_ml100k")
    if str(src).endswith(new_build) and str(dst).endswith(new_build):
      raise OSError("device busy")
    return real_rename(src, dst)
  from p5jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

  def fake_build(key, dataset_dir, tfds_data_dir):
    os.makedirs(os.path.join(tfds_data_dir, f"p5_{key}"))
  monkeypatch.setattr(tfds_builder, "build", fake_build)
  monkeypatch.setattr(os, "rename", flaky_rename)
  with pytest.raises(OSError, match="device busy"):
    prepare.prepare("ml-100k", out, raw_dir=ml_raw, seed=9, allow_download=False)
  monkeypatch.setattr(os, "rename", real_rename)
  assert open(out / "ml100k" / "manifest.json").read() == before
  assert (out / "tfds" / "p5_ml100k" / "old").read_text() == "x"
  assert sorted(os.listdir(out)) == ["ml100k", "tfds"]


def test_cli_prints_one_json_line(tmp_path, ml_raw):
  env = dict(os.environ, PYTHONPATH=_REPO)
  cmd = [sys.executable, "-m", "p5jax.data.prepare", "--dataset=ml-100k",
         f"--raw_dir={ml_raw}", f"--out_dir={tmp_path}", "--indexing=collaborative",
         "--kcore=5", "--seed=1", "--nobuild_tfds"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().split("\n")
  assert len(lines) == 1
  stats = json.loads(lines[0])
  assert stats["dataset"] == "ml100k" and stats["indexing"] == "collaborative"
  assert stats["users"] == 60 and stats["interactions"] > 900
  bad = subprocess.run(cmd[:3] + [f"--raw_dir={tmp_path / 'nothing'}",
                                  f"--out_dir={tmp_path}"],
                       capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode == 1 and "error:" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_dataset_names():
  assert prepare.resolve("ml-100k") == ("ml100k", "movielens")
  assert prepare.resolve("amazon", "Beauty") == ("amazon_beauty", "amazon")
  assert prepare.resolve("p5", "toys") == ("amazon_toys", "p5")
  assert prepare.resolve("yelp") == ("yelp", "yelp")
  with pytest.raises(DataError, match="category"):
    prepare.resolve("amazon", "Clothing")
  with pytest.raises(DataError, match="unknown dataset"):
    prepare.resolve("netflix")


@pytest.mark.parametrize("dataset", ["yelp", "p5"])
def test_other_sources_prepare(tmp_path, dataset):
  root = fixtures.prepared_root(tmp_path, dataset, build_tfds=False)
  key = {"yelp": "yelp", "p5": "amazon_beauty"}[dataset]
  users = _jsonl(os.path.join(root, key, "sequential.jsonl"))
  assert len(users) == 60
  if dataset == "p5":  # the release's fixed negatives are P5's test candidates
    raw = os.path.join(tmp_path, "raw-p5")
    maps = json.load(open(os.path.join(raw, "datamaps.json")))
    ours = json.load(open(os.path.join(root, key, "datamaps.json")))
    p5_to_raw = {v: k for k, v in maps["item2id"].items()}
    negs = {}
    for line in open(os.path.join(raw, "negative_samples.txt")):
      u, *items = line.split()
      negs[u] = {ours["item2id"][p5_to_raw[i]] for i in items}
    for u in users:
      raw_user = ours["id2user"][u["user_id"]]
      c = set(u["candidates"]["test"]) - {u["items"][-1]}
      assert c == negs[maps["user2id"][raw_user]]


requires_ml100k = pytest.mark.skipif(
    not movielens.is_cached(),
    reason="MovieLens-100K not cached; run `python -m p5jax.data.prepare "
           "--dataset=ml-100k --out_dir=/tmp/p5data` once")


@requires_ml100k
def test_real_ml100k_statistics(tmp_path):
  stats = prepare.prepare("ml-100k", tmp_path, build_tfds=False,
                          allow_download=False)
  assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1349, 99287)
  assert stats["raw_interactions"] == 100000
  m = json.load(open(tmp_path / "ml100k" / "manifest.json"))
  assert m["provenance"]["matches_official_ml100k"]


def test_amazon_categories_resolve_to_dataset_keys():
  from p5jax.data import prepare as prepare_lib
  assert prepare_lib.resolve("amazon", "Beauty") == ("amazon_beauty", "amazon")
  assert prepare_lib.resolve("amazon", "Sports_and_Outdoors") == ("amazon_sports", "amazon")
  assert prepare_lib.resolve("amazon_toys") == ("amazon_toys", "amazon")
  with pytest.raises(DataError, match="no dataset key"):
    prepare_lib.resolve("amazon", "Clothing")
