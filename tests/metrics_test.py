"""Tests for p5jax.metrics against hand-computed values."""
import math

import numpy as np
import pytest

from p5jax import metrics


def test_ranking_metrics_hand_computed():
  targets = ["1", "2", "3"]
  predictions = [["1", "5", "6"], ["5", "2"], ["7", "8"]]
  out = metrics.ranking_metrics(targets, predictions, hr_ks=(1, 5), ndcg_ks=(1, 5))
  assert out["hr@1"] == pytest.approx(1 / 3)
  assert out["hr@5"] == pytest.approx(2 / 3)
  assert out["ndcg@1"] == pytest.approx(1 / 3)
  assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 3)


def test_ranking_single_string_prediction_is_a_list_of_one():
  out = metrics.ranking_metrics(["7", "8"], ["7", "9"], hr_ks=(1, 10), ndcg_ks=(10,))
  assert out == {"hr@1": 0.5, "hr@10": 0.5, "ndcg@10": 0.5}


def test_ranking_cutoff_excludes_late_hits():
  preds = [[str(i) for i in range(20)]]
  assert metrics.hit_rate(["12"], preds, 10) == 0.0
  assert metrics.hit_rate(["9"], preds, 10) == 1.0
  assert metrics.ndcg(["9"], preds, 10) == pytest.approx(1 / math.log2(11))


def test_rating_metrics_count_invalid_as_max_error():
  targets = ["4.0", "2.0", "5.0", "1.0"]
  predictions = ["4.0", "3.0", "great", "9.0"]  # "9.0" is off the 1..5 scale
  out = metrics.rating_metrics(targets, predictions)
  # errors: 0, 1, max(5-1, 5-5)=4, max(1-1, 5-1)=4
  assert out["rmse"] == pytest.approx(math.sqrt((0 + 1 + 16 + 16) / 4))
  assert out["mae"] == pytest.approx((0 + 1 + 4 + 4) / 4)
  assert out["rmse_valid"] == pytest.approx(math.sqrt(0.5))
  assert out["mae_valid"] == pytest.approx(0.5)
  assert out["invalid"] == 2
  assert out["invalid_fraction"] == 0.5


def test_rating_metrics_parse_forms():
  assert metrics.parse_rating(b" 4 ") == 4.0
  assert metrics.parse_rating("5.0") == 5.0
  assert metrics.parse_rating("nan") is None
  out = metrics.rating_metrics(["3.0"], ["3"])
  assert out["rmse"] == 0.0 and out["invalid"] == 0


def test_rating_metrics_rejects_bad_targets():
  with pytest.raises(ValueError, match="rating target"):
    metrics.rating_metrics(["x"], ["3.0"])


def test_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.accuracy(["yes", "no"], ["yes"])


def test_bleu_and_rouge():
  same = ["the battery lasts a long time", "great smell and soft feel"]
  assert metrics.bleu4(same, same)["bleu4"] == pytest.approx(100.0)
  assert metrics.bleu2(same, same)["bleu2"] == pytest.approx(100.0)
  assert metrics.bleu4(same, ["zzz qqq", "xxx yyy"])["bleu4"] < 1.0
  out = metrics.rouge(["the cat sat"], ["the cat ran"])
  # unigram overlap 2 of 3 each way -> F1 2/3; bigrams: 1 of 2 -> F1 1/2
  assert out["rouge1"] == pytest.approx(200 / 3)
  assert out["rouge2"] == pytest.approx(50.0)
  assert out["rougeL"] == pytest.approx(200 / 3)


def test_bleu2_is_higher_than_bleu4_on_partial_match():
  t = ["the soap has a very nice smell today"]
  p = ["the soap has a nice smell"]
  assert metrics.bleu2(t, p)["bleu2"] > metrics.bleu4(t, p)["bleu4"] > 0


def test_accuracy_normalizes_case_and_space():
  out = metrics.accuracy(["yes", "no", "like", "dislike"], [" Yes", "yes", "like", "like"])
  assert out["accuracy"] == 50.0


def test_auc_from_hard_answers():
  # P(yes) = 1 for "yes", 0 for "no": scores [1, 0, 0, 0] on labels [1, 0, 1, 0]:
  # pos 1 beats both negatives (2), pos 2 ties both (2 x 0.5) -> 3 / 4.
  out = metrics.yes_no_auc(["yes", "no", "yes", "no"], ["yes", "no", "no", "no"], {})
  assert out["auc"] == pytest.approx(75.0)


def test_auc_from_scores():
  aux = {"scores": np.log([0.9, 0.8, 0.6, 0.7])}
  # P(yes): 0.9, 1-0.8=0.2, 0.6, 1-0.7=0.3 -> positives 0.9, 0.6 above negatives
  out = metrics.yes_no_auc(["yes", "no", "yes", "no"], ["yes", "no", "yes", "no"], aux)
  assert out["auc"] == pytest.approx(100.0)
  # T5X-style [N, num_decodes] scores, ascending: the last column is used.
  aux2 = {"scores": np.log([[0.1, 0.9], [0.1, 0.8], [0.1, 0.6], [0.1, 0.7]])}
  out2 = metrics.yes_no_auc(["yes", "no", "yes", "no"], ["yes", "no", "yes", "no"], aux2)
  assert out2["auc"] == pytest.approx(100.0)


def test_auc_single_class_is_nan():
  assert math.isnan(metrics.yes_no_auc(["yes"], ["yes"], None)["auc"])
