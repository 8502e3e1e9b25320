"""End-to-end tests of the registered SeqIO tasks and mixtures on fixture data."""
import json
import os
import re

import numpy as np
import pytest
import seqio

from p5jax import feature_converters
from p5jax import vocab
from p5jax.data import schema
from tests import fixtures

import tasks.mixtures  # pylint: disable=unused-import
import tasks.tasks
from tasks import inspect as inspect_lib
from tasks import templates

LENGTHS = {"inputs": 512, "targets": 32}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """ML-100K-format and Amazon-format fixtures prepared under one data root."""
  tmp = tmp_path_factory.mktemp("p5data")
  small = {}  # fixtures.make_world defaults: 60 users, 150 items
  data_root = fixtures.prepared_root(tmp, "ml-100k", **small)
  assert fixtures.prepared_root(tmp, "amazon", **small) == data_root
  for key in ("ml100k", "amazon_beauty"):
    folder = schema.dataset_dir(key, data_root)
    if not os.path.exists(os.path.join(folder, vocab.SPIECE_FILENAME)):
      vocab.build_dataset_vocabulary(folder, key, vocab_size=1024)
  schema.set_data_root(data_root)
  yield data_root
  schema.set_data_root(None)


def _held_out(root_dir, key):
  """user_id -> {validation target, test target} from sequential.jsonl."""
  out = {}
  with open(os.path.join(root_dir, key, "sequential.jsonl")) as f:
    for line in f:
      u = json.loads(line)
      out[u["user_id"]] = {u["items"][-2], u["items"][-1]}
  return out


def test_registered_names():
  names = set(seqio.TaskRegistry.names())
  assert {"p5_ml100k_rating", "p5_ml100k_sequential", "p5_ml100k_direct",
          "p5_ml100k_sequential_2_13", "p5_ml100k_rating_1_10",
          "p5_amazon_beauty_explanation_3_12", "p5_yelp_review_4_4"} <= names
  assert not any(n.startswith("p5_ml100k_explanation") or n.startswith("p5_ml100k_review")
                 for n in names)
  mixtures = set(seqio.MixtureRegistry.names())
  assert {"p5_ml100k_pretrain", "p5_ml100k_sequential_eval", "p5_ml100k_unseen",
          "p5_amazon_beauty_pretrain", "p5_amazon_beauty_unseen"} <= mixtures
  assert set(tasks.tasks.REGISTERED_TASKS) <= names


def test_unseen_prompts_absent_from_training():
  for name in schema.DATASETS:
    mix = seqio.get_mixture_or_task(f"p5_{name}_pretrain")
    for task in mix.tasks:
      used = task.preprocessors[0].keywords["templates"]
      assert task.splits == ("train",)
      assert used and all(t.seen for t in used)
      assert not {t.id for t in used} & set(templates.UNSEEN_IDS)
    unseen = seqio.get_mixture_or_task(f"p5_{name}_unseen")
    assert sorted(t.name.rsplit("_", 2)[-2] + "-" + t.name.rsplit("_", 1)[-1]
                  for t in unseen.tasks) == sorted(
                      i for i in templates.UNSEEN_IDS
                      if schema.FAMILIES[int(i[0]) - 1] in schema.DATASETS[name].families)


def test_review_prompt_tasks_also_render_the_train_split():
  # p5jax.embed exports train examples of one fixed prompt for the heads.
  assert seqio.get_mixture_or_task("p5_ml100k_rating_1_1").splits == (
      "train", "validation", "test")
  assert seqio.get_mixture_or_task("p5_ml100k_sequential_2_3").splits == (
      "validation", "test")


def test_metric_fns_per_prompt_kind():
  t = seqio.get_mixture_or_task("p5_ml100k_sequential_2_13")
  assert [f.__name__ for f in t.predict_metric_fns] == ["ranking_metrics"]
  t = seqio.get_mixture_or_task("p5_ml100k_direct_5_1")
  assert [f.__name__ for f in t.predict_with_aux_metric_fns] == ["yes_no_auc"]
  t = seqio.get_mixture_or_task("p5_amazon_beauty_rating_1_1")
  assert t.postprocess_fn("4.0 ", is_target=True) == "4.0"
  t = seqio.get_mixture_or_task("p5_amazon_beauty_sequential_2_1")
  assert t.postprocess_fn(["item_12", " 7 "]) == ["12", "7"]


def test_registration_is_idempotent():
  before = set(seqio.TaskRegistry.names())
  assert tasks.tasks.register_tasks() and tasks.mixtures.register_mixtures()
  assert set(seqio.TaskRegistry.names()) == before
  assert "p5_ml100k_pretrain" in seqio.MixtureRegistry.names()


def _first_prompt_step(task, split, cache):
  """Runs only the prompt preprocessor of `task` on a cached source split."""
  key = (task.source.tfds_dataset.name, split)
  if key not in cache:
    cache[key] = task.source.get_dataset(split, shuffle=False).cache()
  return task.preprocessors[0](cache[key])


def test_every_task_renders_prompts(root):
  """Every task of the Amazon fixture (all five families) renders examples."""
  cache = {}
  names = [n for n in seqio.TaskRegistry.names() if n.startswith("p5_amazon_beauty_")]
  assert len(names) == 5 + 10 + 13 + 12 + 4 + 8
  for name in sorted(names):
    task = seqio.get_mixture_or_task(name)
    split = task.splits[-1]  # test for eval tasks, train for training tasks
    with seqio.utils.map_seed_manager(0):
      ex = next(_first_prompt_step(task, split, cache).as_numpy_iterator(), None)
    assert ex is not None, (name, split)
    assert ex["inputs"] and ex["targets"], (name, split)
    assert b"{" not in ex["inputs"], (name, ex["inputs"])


# The full pipeline (tokenize, EOS, whole-word ids) is the same TOKENIZE steps
# for every task; run it on one task per family and answer kind (the training
# tasks of sequential/direct run in the leak test, all five in the mixtures).
FULL_PIPELINE = [
    "p5_amazon_beauty_explanation", "p5_amazon_beauty_rating_1_9",
    "p5_amazon_beauty_sequential_2_11", "p5_amazon_beauty_explanation_3_12",
    "p5_amazon_beauty_review_4_1", "p5_amazon_beauty_direct_5_8",
]


@pytest.mark.parametrize("name", FULL_PIPELINE)
def test_task_pipeline(root, name):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(LENGTHS, split=task.splits[0], shuffle=False, seed=0)
  ex = next(iter(ds.as_numpy_iterator()), None)
  assert ex is not None, name
  assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1, name
  assert ex["inputs_whole_word_ids"].shape == ex["inputs"].shape, name
  assert ex["inputs_whole_word_ids"][-1] == 0 and ex["inputs_whole_word_ids"][0] == 1


@pytest.mark.parametrize("name,pack,split", [
    ("p5_ml100k_pretrain", False, "train"),
    ("p5_amazon_beauty_unseen", True, "validation"),
])
def test_mixtures_batch_through_feature_converter(root, name, pack, split):
  conv = feature_converters.P5EncDecFeatureConverter(pack=pack)
  ds = seqio.get_dataset(name, LENGTHS, conv, dataset_split=split, shuffle=False,
                         seed=0, batch_size=2)
  batch = next(ds.as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (2, 512)
  assert batch["encoder_whole_word_ids"].shape == (2, 512)
  assert batch["decoder_target_tokens"].shape == (2, 32)
  pad = batch["encoder_input_tokens"] == 0
  assert (batch["encoder_whole_word_ids"][pad] == 0).all()
  assert (batch["encoder_whole_word_ids"][~pad].max() > 1)
  if pack:
    seg = batch["encoder_segment_ids"]
    assert (batch["encoder_whole_word_ids"][seg == 0] == 0).all()
    if "unseen" in name:  # short prompts: several examples per row
      assert seg.max() >= 2


def test_exact_prompt_and_tokens(root):
  task = seqio.get_mixture_or_task("p5_ml100k_sequential_2_1")
  ex = next(task.get_dataset(LENGTHS, split="test", shuffle=False).as_numpy_iterator())
  with open(os.path.join(root, "ml100k", "sequential.jsonl")) as f:
    user = json.loads(f.readline())
  history = " , ".join(user["items"][:-1][-20:])
  assert ex["inputs_pretokenized"].decode() == (
      f"Here are the movies user_{user['user_id']} watched in order: {history} . "
      "Which movie comes next?")
  assert ex["targets_pretokenized"].decode() == user["items"][-1]
  v = vocab.get_vocabulary("ml100k")
  assert ex["targets"].tolist() == v.encode(user["items"][-1]) + [1]
  assert ex["inputs"].tolist() == v.encode(ex["inputs_pretokenized"].decode()) + [1]


def test_training_never_shows_held_out_items(root):
  for key in ("ml100k", "amazon_beauty"):
    held = _held_out(root, key)
    for family in ("sequential", "direct"):
      task = seqio.get_mixture_or_task(f"p5_{key}_{family}")
      ds = task.get_dataset(LENGTHS, split="train", shuffle=False, seed=1, num_epochs=3)
      n = 0
      for ex in ds.as_numpy_iterator():
        user = ex["user_id"].decode()
        prompt = re.sub(r"user_\d+", "", ex["inputs_pretokenized"].decode())
        shown = set(re.findall(r"\b\d+\b", prompt)) | {ex["targets_pretokenized"].decode()}
        assert not shown & held[user], (key, family, prompt)
        n += 1
      assert n == 3 * len(held)


def test_data_not_prepared_is_a_clear_error(root, tmp_path):
  schema.set_data_root(str(tmp_path))
  try:
    task = seqio.get_mixture_or_task("p5_yelp_rating")
    with pytest.raises(tasks.tasks.DataNotPreparedError, match="p5jax.data.prepare"):
      task.get_dataset(LENGTHS, split="train")
  finally:
    schema.set_data_root(root)


def test_inspect_prints_prompts(root):
  exs = list(inspect_lib.examples("p5_ml100k_pretrain", 5, sequence_length=LENGTHS))
  assert len(exs) == 5
  lines = [inspect_lib.format_example(e, i) for i, e in enumerate(exs)]
  assert all(re.search(r"inputs \(\d+ tokens, \d+ words\): \S", l) for l in lines)
  assert all("targets (" in l for l in lines)
