"""Tests for p5jax.vocab: T5-layout training, lazy resolution, whole-word ids."""
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from p5jax import vocab
from p5jax.data import schema
from tasks import templates

CORPUS = [
    "the soap smells great and the bottle is small",
    "a long lasting battery with a bright screen",
    "user_12 bought item_7391 , 12 , 33 -> 904",
] * 50 + list(templates.sample_prompt_texts("amazon_beauty", n_per_template=5))


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vocab") / "spiece.model")
  return vocab.train_vocabulary(CORPUS, path, vocab_size=256)


@pytest.fixture
def restore_root():
  yield
  schema.set_data_root(None)


def _pieces(v, text):
  return [v.tokenizer.IdToPiece(i) for i in v.encode(text)]


def test_t5_id_layout_and_size(spiece):
  v = vocab.get_vocabulary("amazon_beauty", spiece_path=spiece)
  sp = v.tokenizer
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.IdToPiece(0) == "<pad>" and sp.IdToPiece(1) == "</s>"
  # 256 requested = 156 pieces in the file + 100 seqio extra ids.
  import sentencepiece as spm
  assert spm.SentencePieceProcessor(model_file=spiece).GetPieceSize() == 156
  assert v.vocab_size == 256 == vocab.model_vocab_size(v)
  assert v.encode("<extra_id_0>") == [255]


def test_vocab_size_rounds_up_to_128(tmp_path):
  assert vocab.round_up(8000) == 8064 and vocab.round_up(8064) == 8064
  path = vocab.train_vocabulary(CORPUS, str(tmp_path / "m.model"), vocab_size=200)
  v = vocab.get_vocabulary("amazon_beauty", spiece_path=path)
  assert v.vocab_size == 256


def test_digits_are_split_and_consistent(spiece):
  v = vocab.get_vocabulary("amazon_beauty", spiece_path=spiece)
  bare = [p for p in _pieces(v, "7391") if p != "\u2581"]
  assert [p.lstrip("\u2581") for p in bare] == list("7391")
  in_prompt = _pieces(v, "item_7391")
  assert in_prompt[-4:] == ["7", "3", "9", "1"]
  # "391" are the same ids wherever the id appears
  assert v.encode("item_7391")[-3:] == v.encode("7391")[-3:]


def test_whole_word_ids_reference_on_known_pieces():
  pieces = ["\u2581user", "_", "2", "3", "\u2581likes", "\u2581item", "_", "7", "</s>",
            "<pad>"]
  assert vocab.whole_word_ids_from_pieces(pieces) == [1, 1, 1, 1, 2, 3, 3, 3, 0, 0]
  # a sequence that does not start with "▁" still opens word 1
  assert vocab.whole_word_ids_from_pieces(["_", "2", "\u2581a"]) == [1, 1, 2]


def test_whole_word_ids_tf_matches_reference(spiece):
  v = vocab.get_vocabulary("amazon_beauty", spiece_path=spiece)
  text = "user_23 likes item_7391 , 12 -> 904 ."
  ids = v.encode(text) + [1, 0, 0]
  table = tf.constant(vocab.word_start_table(v))
  got = vocab.whole_word_ids(tf.constant(ids, tf.int32), table).numpy().tolist()
  pieces = [v.tokenizer.IdToPiece(i) for i in ids]
  assert got == vocab.whole_word_ids_from_pieces(pieces)
  # words: user_23 likes item_7391 , 12 -> 904 .
  assert max(got) == 8
  assert got[-3:] == [0, 0, 0]
  # Independently: every token of the k-th whitespace word gets id k.
  expected = [k + 1 for k, w in enumerate(text.split()) for _ in v.encode(w)]
  assert got == expected + [0, 0, 0]


def test_whole_word_ids_hand_table():
  # vocab: 0 pad, 1 eos, 2 unk, 3 "▁a", 4 "b", 5 "▁c"
  table = tf.constant([True, True, False, True, False, True])
  tokens = tf.constant([[4, 3, 4, 5, 1, 0], [3, 3, 1, 0, 0, 0]], tf.int32)
  np.testing.assert_array_equal(
      vocab.whole_word_ids(tokens, table).numpy(),
      [[1, 2, 2, 3, 0, 0], [1, 2, 0, 0, 0, 0]])


def test_add_whole_word_ids_preprocessor(spiece):
  v = vocab.get_vocabulary("amazon_beauty", spiece_path=spiece)
  features = {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}
  tokens = v.encode("soap item_12") + [1]
  ds = tf.data.Dataset.from_tensors({"inputs": tf.constant(tokens, tf.int32)})
  ex = next(vocab.add_whole_word_ids(ds, features).as_numpy_iterator())
  expected = [1] * len(v.encode("soap")) + [2] * len(v.encode("item_12")) + [0]
  assert ex["inputs_whole_word_ids"].tolist() == expected


def test_lazy_resolution_follows_data_root(spiece, tmp_path, restore_root, monkeypatch):
  monkeypatch.delenv(vocab.SPIECE_ENV, raising=False)
  v = vocab.get_vocabulary("ml100k")  # created before the root exists
  schema.set_data_root(str(tmp_path / "empty"))
  with pytest.raises(vocab.VocabularyNotFoundError, match="ml100k"):
    _ = v.vocab_size
  os.makedirs(tmp_path / "root" / "ml100k")
  with open(spiece, "rb") as f, open(tmp_path / "root" / "ml100k" / "spiece.model", "wb") as g:
    g.write(f.read())
  schema.set_data_root(str(tmp_path / "root"))
  assert v.vocab_size == 256
  assert v == vocab.get_vocabulary("ml100k")
  assert v != vocab.get_vocabulary("yelp")


def test_env_override_for_a_t5_model(spiece, monkeypatch, restore_root, tmp_path):
  schema.set_data_root(str(tmp_path))
  monkeypatch.setenv(vocab.SPIECE_ENV, spiece)
  assert vocab.get_vocabulary("yelp").sentencepiece_model_file == spiece
  assert vocab.get_vocabulary("yelp").vocab_size == 256


def test_build_dataset_vocabulary_uses_only_train_text(tmp_path):
  folder = tmp_path / "amazon_beauty"
  folder.mkdir()
  rows = [dict(split="train", review_text="\u03c8\u03c8 soft soap " * 3, summary="nice",
               explanation="", user_name="")] * 20
  rows += [dict(split="test", review_text="\u03b6\u03b6 held out", summary="",
                explanation="", user_name="")] * 20
  with open(folder / "reviews.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  with open(folder / "datamaps.json", "w") as f:
    json.dump({"item_titles": {"1": "Rose Water Toner"}}, f)
  path = vocab.build_dataset_vocabulary(str(folder), vocab_size=384)
  assert path == str(folder / "spiece.model")
  v = vocab.get_vocabulary("amazon_beauty", spiece_path=path)
  assert vocab.UNK_ID not in v.encode("\u03c8")
  assert vocab.UNK_ID in v.encode("\u03b6")  # test-split text was never seen
  # template words are learned: "recommend" is not spelled out letter by letter
  assert len(v.encode("recommend")) <= 3


def test_bad_jsonl_names_file_and_line(tmp_path):
  folder = tmp_path / "yelp"
  folder.mkdir()
  (folder / "reviews.jsonl").write_text('{"split": "train"}\n{oops\n')
  with pytest.raises(vocab.VocabularyCorpusError, match="reviews.jsonl: line 2"):
    vocab.dataset_corpus(str(folder), prompt_texts=[])
