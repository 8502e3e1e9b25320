"""Item tokens (`prepare(item_tokens=True)`): one vocabulary piece per item.

Checks the whole path an item takes: the prepared vocabulary, prompt
rendering, the catalog's trie rows, the postprocessor and the span finder.
"""
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

import fixtures  # pylint: disable=g-import-not-at-top
from p5jax import evaluation
from p5jax import features
from p5jax import vocab as vocab_lib
from p5jax.data import schema
from tasks import postprocessors
from tasks import preprocessors as P
from tasks import templates as T

SEQ_SIG = {k: tf.TensorSpec([None] if k in ("history", "candidates", "negatives") else [],
                            tf.string)
           for k in ("user_id", "user_name", "history", "target", "candidates", "negatives")}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("item_tokens")
  tokens = fixtures.prepared_root(tmp / "tok", build_tfds=False, item_tokens=True)
  plain = fixtures.prepared_root(tmp / "plain", build_tfds=False)
  yield {"tokens": tokens, "plain": plain}
  schema.set_data_root(None)


def _vocab(root):
  path = os.path.join(schema.dataset_dir("ml100k", root), "spiece.model")
  return seqio.SentencePieceVocabulary(path, extra_ids=vocab_lib.EXTRA_IDS)


def test_manifest_and_one_piece_per_item(roots):
  manifest = schema.read_manifest("ml100k", roots["tokens"])
  assert manifest["item_tokens"] is True
  assert schema.read_manifest("ml100k", roots["plain"])["item_tokens"] is False
  num_items = manifest["counts"]["items"]
  vocab = _vocab(roots["tokens"])
  ids = [vocab.encode(schema.item_token(str(i))) for i in range(1, num_items + 1)]
  # "<i7>" -> [word start, its own piece]: same length for every item, and the
  # item pieces are all distinct.
  assert {len(t) for t in ids} == {2}
  assert len({t[-1] for t in ids}) == num_items
  assert vocab.decode(ids[6]) == "<i7>"
  # The plain vocabulary spells items with digits.
  assert len(_vocab(roots["plain"]).encode("1234")) > 2


def test_prompts_write_item_tokens_only_when_prepared_so(roots):
  user = dict(user_id="3", user_name="", history=["10", "11", "12"], target="14",
              candidates=["95", "14"], negatives=["90"])
  ds = tf.data.Dataset.from_generator(lambda: iter([user]), output_signature=SEQ_SIG)
  t = [T.TEMPLATES["2-7"].specialize(T.wording_for("ml100k"))]
  outputs = {}
  for kind, root in roots.items():
    schema.set_data_root(root)
    pp = P.family_preprocessor("sequential", t, train=False, source="ml100k")
    [ex] = list(pp(ds).as_numpy_iterator())
    outputs[kind] = (ex["inputs"].decode(), ex["targets"].decode(),
                     [c.decode() for c in ex["candidates"]])
  assert outputs["tokens"][0] == ("user_3 watched <i10> , <i11> , <i12> . Pick the next "
                                  "movie for this user from these candidates: <i95> , <i14>")
  assert outputs["tokens"][1] == "<i14>"
  assert outputs["tokens"][2] == ["95", "14"]  # ids for the evaluator stay bare
  assert outputs["plain"][1] == "14" and "<i" not in outputs["plain"][0]
  assert postprocessors.item_id(outputs["tokens"][1]) == "14"
  assert postprocessors.item_id(["<i14>", "item_<i9>", "item_12"]) == ["14", "9", "12"]


def test_catalog_trie_rows_are_item_pieces(roots):
  catalog = evaluation.Catalog.load("ml100k", roots["tokens"])
  assert catalog.items_as_tokens
  vocab = _vocab(roots["tokens"])
  index = evaluation.ItemIndex.build(catalog, vocab, vocab_lib.model_vocab_size(vocab))
  # [word start, item piece, EOS] per item; decoding a row gives the token back.
  assert index.targets_NxT.shape == (len(catalog.item_ids), 3)
  assert np.all(index.targets_NxT[:, 2] == vocab.eos_id)
  row = index.rows(np.array([catalog.index["7"]]))[0]
  assert postprocessors.item_id(vocab.decode(row[:2].tolist())) == "7"
  assert not evaluation.Catalog.load("ml100k", roots["plain"]).items_as_tokens


def test_span_finder_reads_item_token_words(roots):
  vocab = _vocab(roots["tokens"])
  tokens = vocab.encode("Will user_3 like item_<i7> ?") + [vocab.eos_id]
  pieces = np.array([vocab.tokenizer.id_to_piece(i) for i in range(vocab.vocab_size)],
                    dtype=object)
  tokens = np.array([tokens], np.int32)
  wwids = np.array([vocab_lib.whole_word_ids_from_pieces(pieces[tokens[0]].tolist())],
                   np.int32)
  _, item_mask, users, items = features.SpanFinder(pieces)(tokens, wwids)
  assert users == ["3"] and items == ["7"]
  assert item_mask.sum() >= 2  # "item", "_", "<i7>" pieces of one word
