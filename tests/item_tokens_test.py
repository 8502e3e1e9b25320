"""Item tokens (`prepare(item_tokens=True)`): one vocabulary piece per item.

Checks the whole path an item takes: the prepared vocabulary, prompt
rendering, the catalog's trie rows, the postprocessor and the span finder.
"""
import json
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
from preprocessors_test import SEQ_SIG  # pylint: disable=g-bad-import-order



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


def test_cooccurrence_init_rows_follow_training_co_occurrence(roots):
  """Items of one taste group (the fixture's world) start closer together."""
  import types  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from p5jax import item_init  # pylint: disable=g-import-not-at-top
  schema.set_data_root(roots["tokens"])
  vocab = _vocab(roots["tokens"])
  rng = np.random.default_rng(0)
  table = rng.normal(size=(vocab_lib.model_vocab_size(vocab), 16)).astype(np.float32)
  params = {"token_embedder": {"embedding": jnp.asarray(table)}, "other": jnp.ones(3)}
  model = types.SimpleNamespace(input_vocabulary=vocab)
  out = item_init.CooccurrenceInit(dataset="ml100k", window=3)(params, model)
  new = np.asarray(out["token_embedder"]["embedding"])
  catalog = evaluation.Catalog.load("ml100k")
  ids = item_init.item_token_ids(catalog, vocab)
  others = np.setdiff1d(np.arange(len(table)), ids)
  np.testing.assert_array_equal(new[others], table[others])  # only item rows change
  assert not np.allclose(new[ids], table[ids])
  assert new[ids].std() == pytest.approx(table[ids].std(), rel=1e-3)
  # Fixture users mostly rate items of their own group (item raw id mod 5):
  # rows of the same group are more similar than rows of different groups.
  id2item = {v: k for k, v in json.load(open(os.path.join(
      schema.dataset_dir("ml100k", roots["tokens"]), "datamaps.json")))["item2id"].items()}
  group = np.array([(int(id2item[i]) - 1) % 5 for i in catalog.item_ids])
  rows = new[ids] / np.linalg.norm(new[ids], axis=1, keepdims=True)
  cos = rows @ rows.T
  same = group[:, None] == group[None, :]
  off_diag = ~np.eye(len(ids), dtype=bool)
  assert cos[same & off_diag].mean() > cos[~same].mean() + 0.2
  # Deterministic.
  again = item_init.CooccurrenceInit(dataset="ml100k", window=3)(params, model)
  np.testing.assert_array_equal(np.asarray(again["token_embedder"]["embedding"]), new)


def test_cooccurrence_init_needs_item_tokens(roots):
  import types  # pylint: disable=g-import-not-at-top
  from p5jax import item_init  # pylint: disable=g-import-not-at-top
  schema.set_data_root(roots["plain"])
  model = types.SimpleNamespace(input_vocabulary=_vocab(roots["plain"]))
  params = {"token_embedder": {"embedding": np.zeros((512, 8), np.float32)}}
  with pytest.raises(item_init.ItemInitError, match="item tokens"):
    item_init.CooccurrenceInit(dataset="ml100k")(params, model)
