"""SentencePiece vocabularies in the T5 id layout, and P5's whole-word ids.

Training (`train_vocabulary`, `build_dataset_vocabulary`): a unigram
SentencePiece model with pad=0, eos=1, unk=2 and no bos, as T5 expects,
``character_coverage=1.0`` and ``split_digits=True``. Splitting digits makes an
item id tokenize the same way in every context and with one piece per digit
("7391" -> "▁7" "3" "9" "1"), which keeps the item-decoding trie small and
regular; P5's whole-word ids then tie the digits of one id together. The
corpus is the dataset's text (titles, reviews, ``corpus.txt``) plus every
prompt template rendered with synthetic ids, so template words become pieces.
SeqIO appends 100 sentinel ids; the piece count is chosen so pieces + 100 is a
multiple of 128 (`model_vocab_size` rounds up when a small corpus cannot fill
the request).

Use (`get_vocabulary`): a `seqio.SentencePieceVocabulary` whose model file is
resolved lazily -- at first use, not at import -- so tasks can be registered
before the data root is set. Resolution order: explicit ``spiece_path``
argument, gin ``spiece_override.path``, ``$P5JAX_SPIECE`` (e.g. a stock T5
``spiece.model``), else ``<data_root>/<dataset>/spiece.model``.

Whole-word ids (`whole_word_ids`, `add_whole_word_ids`): per token, the 1-based
index of the word it belongs to (a word starts at a piece beginning with "▁"),
0 for padding and EOS. ``"user_23 likes item_7"`` ->
pieces ``▁user _ 2 3 ▁likes ▁item _ 7 </s>`` -> ``1 1 1 1 2 3 3 3 0``.
"""
import io
import json
import os
from typing import Iterable, List, Optional, Sequence, Union

import gin
import numpy as np
import seqio
import tensorflow as tf

from p5jax import fileio
from p5jax.data import schema

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
EXTRA_IDS = 100
VOCAB_MULTIPLE = 128
DEFAULT_VOCAB_SIZE = 8192
WORD_START = "\u2581"  # SentencePiece's word-boundary marker "▁"
SPIECE_FILENAME = "spiece.model"
SPIECE_ENV = "P5JAX_SPIECE"
WHOLE_WORD_SUFFIX = "_whole_word_ids"


class VocabularyNotFoundError(FileNotFoundError):
  """The SentencePiece model a vocabulary points at does not exist."""


class VocabularyCorpusError(ValueError):
  """A prepared file read for vocabulary training is malformed."""


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


def model_vocab_size(vocabulary: seqio.Vocabulary) -> int:
  """Embedding rows for `vocabulary`: its size (with extra ids) rounded to 128."""
  return round_up(vocabulary.vocab_size)


# ----------------------------------------------------------------- training


def train_vocabulary(texts: Iterable[str], out_path: str,
                     vocab_size: int = DEFAULT_VOCAB_SIZE,
                     extra_ids: int = EXTRA_IDS,
                     user_defined_symbols: Sequence[str] = (),
                     max_sentences: int = 2_000_000,
                     seed: int = 0) -> str:
  """Trains a T5-layout SentencePiece model on `texts` and writes `out_path`.

  Args:
    texts: training sentences (one string each; newlines are split).
    out_path: where to write the ``.model`` file (atomically).
    vocab_size: the *model* vocabulary wanted, counting SeqIO's `extra_ids`;
      rounded up to a multiple of 128. SentencePiece gets
      ``vocab_size - extra_ids`` pieces, or fewer if the corpus is too small.
    extra_ids: sentinel ids SeqIO will append.
    user_defined_symbols: strings that must always be one piece.
    max_sentences: corpus sentences sampled for training.
    seed: sampling seed (SentencePiece training itself is deterministic).

  Returns:
    `out_path`.
  """
  import sentencepiece as spm
  target_pieces = round_up(vocab_size) - extra_ids
  if target_pieces < 16:
    raise ValueError(f"vocab_size={vocab_size} leaves {target_pieces} pieces "
                     f"after {extra_ids} extra ids")
  lines = [l.strip() for t in texts for l in str(t).splitlines()]
  lines = [l for l in lines if l]
  if not lines:
    raise ValueError("train_vocabulary: the corpus is empty")
  if len(lines) > max_sentences:
    rng = np.random.default_rng(seed)
    lines = [lines[i] for i in sorted(rng.choice(len(lines), max_sentences,
                                                 replace=False))]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model,
      model_type="unigram", vocab_size=target_pieces, hard_vocab_limit=False,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      character_coverage=1.0, split_digits=True,
      user_defined_symbols=list(user_defined_symbols),
      max_sentence_length=1 << 16, num_threads=2,
      minloglevel=2)
  fileio.atomic_write(out_path, model.getvalue())
  return out_path


def _prompt_texts(dataset: str, titles: Sequence[str]) -> Iterable[str]:
  # Templates live with the tasks (tasks/templates.py); this is the one place
  # the library reaches up to them, because the vocabulary must know their
  # words. Imported lazily so `p5jax` stays importable without `tasks`.
  from tasks import templates  # pylint: disable=g-import-not-at-top
  return templates.sample_prompt_texts(dataset, titles=titles)


def dataset_corpus(dataset_dir: str, dataset: Optional[str] = None,
                   prompt_texts: Optional[Iterable[str]] = None) -> List[str]:
  """Vocabulary corpus of a prepared dataset dir (see `schema.py`).

  ``corpus.txt`` (titles, metadata, user names, *train* review text, written by
  ``prepare``) when present; otherwise item titles from ``datamaps.json`` and
  the train-split text of ``reviews.jsonl`` (held-out reviews never shape the
  vocabulary). Plus every prompt template rendered with synthetic ids.
  """
  dataset = dataset or os.path.basename(os.path.normpath(dataset_dir))
  texts: List[str] = []
  titles: List[str] = []
  maps_path = os.path.join(dataset_dir, "datamaps.json")
  if os.path.exists(maps_path):
    with open(maps_path, encoding="utf-8") as f:
      maps = json.load(f)
    titles = [t for t in (maps.get("item_titles") or {}).values() if t]
  corpus_path = os.path.join(dataset_dir, "corpus.txt")
  reviews_path = os.path.join(dataset_dir, "reviews.jsonl")
  if os.path.exists(corpus_path):
    with open(corpus_path, encoding="utf-8") as f:
      texts.extend(f.read().splitlines())
  else:
    texts.extend(titles)
    if os.path.exists(reviews_path):
      with open(reviews_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise VocabularyCorpusError(
                f"{reviews_path}: line {line_no}: bad JSON ({e})") from e
          if row.get("split") == "train":
            texts.extend(row.get(k) or "" for k in
                         ("review_text", "summary", "explanation", "user_name"))
  if prompt_texts is None:
    prompt_texts = _prompt_texts(dataset, titles[:2000])
  texts.extend(prompt_texts)
  return [t for t in texts if t]


def build_dataset_vocabulary(dataset_dir: str, dataset: Optional[str] = None,
                             vocab_size: int = DEFAULT_VOCAB_SIZE,
                             prompt_texts: Optional[Iterable[str]] = None,
                             item_symbols: Sequence[str] = ()) -> str:
  """Trains ``<dataset_dir>/spiece.model`` from the prepared data in that dir.

  Call after `datamaps.json` / `reviews.jsonl` are written (and before the
  manifest's checksums). `dataset` defaults to the dir's basename.
  `item_symbols` (item tokens, ``<i7391>``) become pieces of their own, on top
  of `vocab_size` learned pieces.
  """
  texts = dataset_corpus(dataset_dir, dataset, prompt_texts)
  return train_vocabulary(texts, os.path.join(dataset_dir, SPIECE_FILENAME),
                          vocab_size=vocab_size + len(item_symbols),
                          user_defined_symbols=item_symbols)


# -------------------------------------------------------------------- usage


@gin.configurable
def spiece_override(path: Optional[str] = None) -> Optional[str]:
  """Gin hook: ``spiece_override.path = "/models/t5/spiece.model"``."""
  return path


def resolve_spiece_path(dataset: str, spiece_path: Optional[str] = None) -> str:
  return (spiece_path or spiece_override() or os.environ.get(SPIECE_ENV) or
          os.path.join(schema.dataset_dir(dataset), SPIECE_FILENAME))


class DatasetVocabulary(seqio.SentencePieceVocabulary):
  """`seqio.SentencePieceVocabulary` whose model file is found at first use.

  Equality (which SeqIO mixtures check) compares dataset name, override and
  extra ids, not the path the data root happened to resolve to.
  """

  def __init__(self, dataset: str, extra_ids: int = EXTRA_IDS,
               spiece_path: Optional[str] = None):
    self._dataset = dataset
    self._spiece_path = spiece_path
    self._loaded_from: Optional[str] = None
    super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)

  @property
  def dataset(self) -> str:
    return self._dataset

  @property
  def sentencepiece_model_file(self) -> str:
    return resolve_spiece_path(self._dataset, self._spiece_path)

  def _model_context(self):
    path = self.sentencepiece_model_file
    if self._model is None or self._loaded_from != path:
      if not tf.io.gfile.exists(path):
        raise VocabularyNotFoundError(
            f"no SentencePiece model for dataset {self._dataset!r} at {path}. "
            "Prepare the dataset (python -m p5jax.data.prepare), set the data "
            f"root, or point ${SPIECE_ENV} / gin spiece_override.path at a "
            "T5 spiece.model.")
      # pylint: disable=protected-access
      self._model = seqio.vocabularies._load_model(
          path, self._extra_ids, None, self._reverse_extra_ids)
      self._loaded_from = path
    return self._model

  def __getstate__(self):
    state = super().__getstate__()
    state.pop("_loaded_from", None)
    return state

  def __setstate__(self, state):
    super().__setstate__(state)
    self._loaded_from = None

  def __repr__(self):
    return (f"DatasetVocabulary(dataset={self._dataset!r}, "
            f"spiece_path={self._spiece_path!r}, extra_ids={self._extra_ids})")

  __str__ = __repr__


def get_vocabulary(dataset: str, spiece_path: Optional[str] = None,
                   extra_ids: int = EXTRA_IDS) -> DatasetVocabulary:
  """The vocabulary of a dataset key from `schema.DATASETS` (lazily resolved)."""
  return DatasetVocabulary(dataset, extra_ids=extra_ids, spiece_path=spiece_path)


# -------------------------------------------------------- whole-word ids


def whole_word_ids_from_pieces(pieces: Sequence[str],
                               special: Sequence[str] = ("<pad>", "</s>")) -> List[int]:
  """Reference implementation on piece strings: 1-based word index, 0 = none."""
  out, word = [], 0
  for i, piece in enumerate(pieces):
    if piece in special:
      out.append(0)
      continue
    if piece.startswith(WORD_START) or word == 0:
      word += 1
    out.append(word)
  return out


def word_start_table(vocabulary: seqio.SentencePieceVocabulary) -> np.ndarray:
  """bool [vocab_size]: True where the piece starts a word ("▁..." or sentinel)."""
  sp = vocabulary.tokenizer
  table = np.ones(vocabulary.vocab_size, dtype=bool)
  for i in range(sp.GetPieceSize()):
    table[i] = sp.IdToPiece(i).startswith(WORD_START)
  return table


def whole_word_ids(tokens: tf.Tensor, word_starts: tf.Tensor,
                   eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> tf.Tensor:
  """Word index per token along the last axis (int32, same shape as `tokens`).

  Args:
    tokens: int32 [..., L] token ids of one (unpacked) sequence per row.
    word_starts: bool [V] from `word_start_table`.
    eos_id, pad_id: tokens that get id 0.

  Returns:
    int32 [..., L]: 1 for the first word, 2 for the next, ...; 0 at pad/EOS. The
    first real token always opens word 1 even if it lacks the "▁" marker.
  """
  tokens = tf.convert_to_tensor(tokens, tf.int32)
  is_token = tf.logical_and(tf.not_equal(tokens, eos_id),
                            tf.not_equal(tokens, pad_id))
  starts = tf.logical_and(tf.gather(word_starts, tokens), is_token)
  first = tf.logical_and(
      is_token, tf.equal(tf.cumsum(tf.cast(is_token, tf.int32), axis=-1), 1))
  starts = tf.logical_or(starts, first)
  ids = tf.cumsum(tf.cast(starts, tf.int32), axis=-1)
  return ids * tf.cast(is_token, tf.int32)


def add_whole_word_ids(dataset: tf.data.Dataset,
                       output_features: seqio.preprocessors.OutputFeaturesType,
                       feature: str = "inputs") -> tf.data.Dataset:
  """SeqIO preprocessor: adds ``<feature>_whole_word_ids`` after tokenization.

  Place it after ``seqio.preprocessors.append_eos_after_trim`` so the ids have
  the final (trimmed, EOS-terminated) length of `feature`.
  """
  vocab = output_features[feature].vocabulary
  word_starts = tf.constant(word_start_table(vocab))
  eos_id = vocab.eos_id
  key = feature + WHOLE_WORD_SUFFIX

  def add(ex):
    ex = dict(ex)
    ex[key] = whole_word_ids(ex[feature], word_starts, eos_id=eos_id)
    return ex

  return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)
