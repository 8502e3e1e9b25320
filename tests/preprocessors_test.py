"""Tests for tasks.preprocessors on examples shaped like the schema's TFDS features."""
import re

import gin
import pytest
import seqio
import tensorflow as tf

from tasks import preprocessors as P
from tasks import templates as T

SEQ_SIG = {"user_id": tf.TensorSpec([], tf.string), "user_name": tf.TensorSpec([], tf.string),
           "history": tf.TensorSpec([None], tf.string), "target": tf.TensorSpec([], tf.string),
           "candidates": tf.TensorSpec([None], tf.string),
           "negatives": tf.TensorSpec([None], tf.string)}
REVIEW = {"user_id": "", "item_id": "", "user_name": "", "item_title": "", "rating": 0.0,
          "timestamp": 0, "review_text": "", "summary": "", "explanation": "", "feature": ""}


def seq_ds(rows):
  return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=SEQ_SIG)


def review_ds(rows):
  rows = [{**REVIEW, **r} for r in rows]
  sig = {k: tf.TensorSpec([], tf.float32 if k == "rating" else
                          tf.int64 if k == "timestamp" else tf.string) for k in REVIEW}
  return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=sig)


def run(pp, ds, seed=None):
  if seed is None:
    return list(pp(ds).as_numpy_iterator())
  with seqio.utils.map_seed_manager(seed):
    out = pp(ds)
  return list(out.as_numpy_iterator())


def text(ex, key):
  return ex[key].decode()


USER = dict(user_id="1", user_name="", history=["10", "11", "12", "13"], target="",
            candidates=[], negatives=["90", "91", "92"])
ML_SEQ = T.dataset_templates("ml100k", "sequential", seen=True)


def test_sequential_train_exact_prompts_for_fixed_seed():
  pp = P.family_preprocessor("sequential", ML_SEQ, train=True,
                             config=P.PromptConfig(num_train_candidates=3))
  out = run(pp, seq_ds([USER]).repeat(3), seed=7)
  assert [(text(e, "inputs"), text(e, "targets")) for e in out] == [
      ("Interaction sequence of user_1: 10 , 11 , 12 . Predict the movie this "
       "user will watch next.", "13"),
      ("user_1 has watched 10 -> 11 . Recommend the next movie for this user.", "12"),
      ("Given that user_1 watched 10 -> 11 , name the next movie.", "12"),
  ]
  # deterministic given the seed, different for another seed
  again = run(pp, seq_ds([USER]).repeat(3), seed=7)
  assert [e["inputs"] for e in again] == [e["inputs"] for e in out]
  other = run(pp, seq_ds([USER]).repeat(3), seed=8)
  assert [e["inputs"] for e in other] != [e["inputs"] for e in out]


def _ids(prompt):
  return re.findall(r"\b\d+\b", re.sub(r"user_\d+", "", prompt))


def test_sequential_train_targets_and_histories_respect_leave_one_out():
  # full sequence 10..17: validation 16, test 17 -> train history 10..15
  user = dict(USER, history=[str(i) for i in range(10, 16)])
  pp = P.family_preprocessor("sequential", ML_SEQ, train=True,
                             config=P.PromptConfig(num_train_candidates=3, max_history=3))
  out = run(pp, seq_ds([user]).repeat(200), seed=1)
  targets, shown = set(), set()
  for ex in out:
    prompt, target = text(ex, "inputs"), text(ex, "targets")
    assert not {"16", "17"} & set(_ids(prompt)) and target not in ("16", "17")
    if target in ("yes", "no"):
      continue
    targets.add(target)
    t = int(target)
    history = [int(i) for i in _ids(prompt) if 10 <= int(i) < 16]
    if "candidates" not in prompt and "among" not in prompt and "list" not in prompt \
        and "following" not in prompt:
      assert history == list(range(max(10, t - 3), t))  # capped, ends before target
  # every admissible end position is drawn: 11..15 (third-to-last of the full seq)
  assert targets == {"11", "12", "13", "14", "15"}


def test_sequential_candidates_and_yes_no_in_training():
  cand_t = [T.TEMPLATES["2-7"].specialize(T.wording_for("ml100k"))]
  pp = P.family_preprocessor("sequential", cand_t, train=True,
                             config=P.PromptConfig(num_train_candidates=3))
  for ex in run(pp, seq_ds([USER]).repeat(20), seed=3):
    cands = text(ex, "inputs").split("candidates: ")[1].split(" , ")
    assert len(cands) == 3 and text(ex, "targets") in cands
    assert set(cands) - {text(ex, "targets")} <= {"90", "91", "92"}
  yn_t = [T.TEMPLATES["2-11"].specialize(T.wording_for("ml100k"))]
  pp = P.family_preprocessor("sequential", yn_t, train=True)
  answers = [text(e, "targets") for e in run(pp, seq_ds([USER]).repeat(40), seed=3)]
  assert set(answers) == {"yes", "no"}


def test_sequential_eval_uses_stored_target_and_candidates():
  user = dict(USER, target="14", candidates=["95", "14", "96"])
  t = [T.TEMPLATES["2-7"].specialize(T.wording_for("ml100k"))]
  [ex] = run(P.family_preprocessor("sequential", t, train=False), seq_ds([user]))
  assert text(ex, "inputs") == ("user_1 watched 10 , 11 , 12 , 13 . Pick the next movie "
                                "for this user from these candidates: 95 , 14 , 96")
  assert text(ex, "targets") == "14"
  assert [c.decode() for c in ex["candidates"]] == ["95", "14", "96"]
  # yes/no eval questions are the same in every run (no seeds)
  yn = [T.TEMPLATES["2-12"].specialize(T.wording_for("ml100k"))]
  users = [dict(user, user_id=str(u)) for u in range(1, 9)]
  first = run(P.family_preprocessor("sequential", yn, train=False), seq_ds(users))
  second = run(P.family_preprocessor("sequential", yn, train=False), seq_ds(users))
  assert [e["inputs"] for e in first] == [e["inputs"] for e in second]
  assert {text(e, "targets") for e in first} == {"yes", "no"}
  for e in first:
    asked = re.search(r"item_(\d+)", text(e, "inputs")).group(1)
    assert (asked == "14") == (text(e, "targets") == "yes")


def test_max_history_via_gin():
  user = dict(USER, history=[str(i) for i in range(10, 40)], target="40",
              candidates=["40", "41"])
  t = [T.TEMPLATES["2-1"].specialize(T.wording_for("ml100k"))]
  with gin.unlock_config():
    gin.bind_parameter("PromptConfig.max_history", 2)
  try:
    [ex] = run(P.family_preprocessor("sequential", t, train=False), seq_ds([user]))
  finally:
    gin.clear_config()
  assert "in order: 38 , 39 ." in text(ex, "inputs")
  [ex] = run(P.family_preprocessor("sequential", t, train=False), seq_ds([user]))
  assert "in order: 20 , 21 ," in text(ex, "inputs")  # default 20


def test_direct_train_and_eval():
  t = [T.TEMPLATES["5-5"].specialize(T.wording_for("amazon_beauty"))]
  pp = P.family_preprocessor("direct", t, train=True,
                             config=P.PromptConfig(num_train_candidates=4))
  for ex in run(pp, seq_ds([USER]).repeat(10), seed=0):
    cands = text(ex, "inputs").split("candidates: ")[1].split(" , ")
    assert text(ex, "targets") in USER["history"] and text(ex, "targets") in cands
    assert len(cands) == 4
  user = dict(USER, target="14", candidates=["14", "95", "96"])
  [ex] = run(P.family_preprocessor("direct", t, train=False), seq_ds([user]))
  assert text(ex, "inputs") == ("Pick the best item for user_1 from these candidates: "
                                "14 , 95 , 96")
  assert text(ex, "targets") == "14"


def test_rating_eval_exact_prompts():
  row = dict(user_id="5", item_id="42", user_name="Ann", item_title="Rose Toner", rating=4.0)
  wording = T.wording_for("amazon_beauty")
  expected = {
      "1-1": ("What star rating, from 1 to 5, would user_5 give to item_42?", "4.0"),
      "1-3": ("Is user_5 going to rate item_42 with 5 stars? Answer yes or no.", "no"),
      "1-8": ("Will Ann award \"Rose Toner\" a 5-star rating? Reply yes or no.", "no"),
      "1-4": ("Would user_5 like or dislike item_42?", "like"),
  }
  for tid, (inputs, targets) in expected.items():
    pp = P.family_preprocessor("rating", [T.TEMPLATES[tid].specialize(wording)], train=False)
    [ex] = run(pp, review_ds([row]))
    assert (text(ex, "inputs"), text(ex, "targets")) == (inputs, targets), tid


def test_rating_yes_no_training_is_consistent():
  t = [T.TEMPLATES["1-3"].specialize(T.wording_for("amazon_beauty"))]
  pp = P.family_preprocessor("rating", t, train=True)
  rows = [dict(user_id="5", item_id="42", rating=float(r)) for r in range(1, 6)]
  answers = set()
  for ex in run(pp, review_ds(rows).repeat(20), seed=0):
    star = int(re.search(r"with (\d) stars", text(ex, "inputs")).group(1))
    assert 1 <= star <= 5
    answers.add(text(ex, "targets"))
  assert answers == {"yes", "no"}


def test_templates_needing_empty_fields_are_skipped():
  rows = [dict(user_id="5", item_id="42", rating=3.0, explanation="it lasts long",
               feature=""),
          dict(user_id="6", item_id="43", rating=3.0, explanation="", feature="x")]
  seen = T.dataset_templates("amazon_beauty", "explanation", seen=True)
  out = run(P.family_preprocessor("explanation", seen, train=True), review_ds(rows * 30),
            seed=0)
  assert len(out) == 30  # the example without an explanation is dropped
  assert all(text(e, "targets") == "it lasts long" for e in out)
  assert not any("the word" in text(e, "inputs") for e in out)  # no feature prompts
  # an eval task whose prompt needs the feature word has no example to show
  feat = [T.TEMPLATES["3-4"].specialize(T.wording_for("amazon_beauty"))]
  assert run(P.family_preprocessor("explanation", feat, train=False), review_ds(rows)) == []


def test_review_text_is_truncated():
  row = dict(user_id="5", item_id="42", rating=2.0, review_text="w " * 500, summary="bad")
  t = [T.TEMPLATES["4-2"].specialize(T.wording_for("amazon_beauty"))]
  [ex] = run(P.family_preprocessor("review", t, train=False,
                                   config=P.PromptConfig(max_review_words=5)), review_ds([row]))
  assert text(ex, "inputs").endswith("Review: w w w w w")
  assert text(ex, "targets") == "2.0"


def test_family_preprocessor_rejects_other_family():
  with pytest.raises(ValueError, match="not 'rating' templates"):
    P.family_preprocessor("rating", ML_SEQ, train=True)
