"""Recommendation and generation metrics as SeqIO metric functions.

Every function takes postprocessed ``targets`` and ``predictions`` (SeqIO's
``metric_fn(targets, predictions)`` signature; `yes_no_auc` also takes
``aux_values``) and returns ``{name: float}``; SeqIO / CLU log them.

* Ranking: `ranking_metrics` (HR@k, NDCG@k). A prediction is a ranked list of
  item ids, best first (e.g. the beams of a constrained beam search reversed
  into descending score order), or a single id (a list of one).
* Rating: `rating_metrics` (RMSE, MAE). Unparseable predictions are never
  dropped: they are counted (`invalid`) and scored as the largest possible
  error on the rating scale, so a model that emits garbage is penalized.
  `rmse_valid`/`mae_valid` over parseable predictions alone are reported too.
* Text: `bleu` (sacrebleu BLEU-4 / BLEU-2) and `rouge` (rouge-score 1/2/L F1).
* Binary answers: `accuracy` ("yes"/"no", "like"/"dislike") and `yes_no_auc`.
"""
import functools
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

RATING_MIN, RATING_MAX = 1.0, 5.0
POSITIVE_ANSWERS = ("yes", "like")
NEGATIVE_ANSWERS = ("no", "dislike")

Ranked = Union[str, Sequence[str]]


def _as_ranked(prediction: Ranked) -> Sequence[str]:
  if isinstance(prediction, (str, bytes)):
    return [prediction]
  return list(prediction)


def hit_rate(targets: Sequence[str], predictions: Sequence[Ranked], k: int) -> float:
  """Fraction of examples whose target is among the first k predictions."""
  if not targets:
    return 0.0
  hits = [t in _as_ranked(p)[:k] for t, p in zip(targets, predictions)]
  return float(np.mean(hits))


def ndcg(targets: Sequence[str], predictions: Sequence[Ranked], k: int) -> float:
  """NDCG@k with one relevant item: 1/log2(rank + 1) if rank <= k else 0."""
  if not targets:
    return 0.0
  gains = []
  for t, p in zip(targets, predictions):
    ranked = _as_ranked(p)[:k]
    gains.append(1.0 / math.log2(ranked.index(t) + 2) if t in ranked else 0.0)
  return float(np.mean(gains))


def ranking_metrics(targets: Sequence[str], predictions: Sequence[Ranked],
                    hr_ks: Sequence[int] = (1, 5, 10),
                    ndcg_ks: Sequence[int] = (5, 10)) -> Dict[str, float]:
  """HR@k and NDCG@k (P5 reports HR@1/5/10 and NDCG@5/10)."""
  _check_lengths(targets, predictions)
  out = {f"hr@{k}": hit_rate(targets, predictions, k) for k in hr_ks}
  out.update({f"ndcg@{k}": ndcg(targets, predictions, k) for k in ndcg_ks})
  return out


def parse_rating(text: Any) -> Optional[float]:
  """"4.0" / "4" / " 4.5 " -> float; None if unparseable or out of range."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  if isinstance(text, (int, float, np.number)):
    value = float(text)
  else:
    try:
      value = float(str(text).strip())
    except ValueError:
      return None
  if not math.isfinite(value) or not RATING_MIN <= value <= RATING_MAX:
    return None
  return value


def rating_metrics(targets: Sequence[Any], predictions: Sequence[Any]) -> Dict[str, float]:
  """RMSE / MAE with unparseable predictions scored as the maximum error.

  Returns rmse, mae (all examples; an invalid prediction counts as the
  farthest rating on the 1..5 scale from the target), rmse_valid / mae_valid
  (parseable predictions only; NaN when there are none), invalid (count) and
  invalid_fraction.
  """
  _check_lengths(targets, predictions)
  errors, valid_errors, invalid = [], [], 0
  for t, p in zip(targets, predictions):
    target = parse_rating(t)
    if target is None:
      raise ValueError(f"rating target {t!r} is not a number in "
                       f"[{RATING_MIN}, {RATING_MAX}]")
    pred = parse_rating(p)
    if pred is None:
      invalid += 1
      errors.append(max(target - RATING_MIN, RATING_MAX - target))
    else:
      errors.append(abs(pred - target))
      valid_errors.append(errors[-1])
  n = len(errors)

  def rmse(e):
    return float(np.sqrt(np.mean(np.square(e)))) if e else float("nan")

  def mae(e):
    return float(np.mean(e)) if e else float("nan")

  return {
      "rmse": rmse(errors), "mae": mae(errors),
      "rmse_valid": rmse(valid_errors), "mae_valid": mae(valid_errors),
      "invalid": float(invalid),
      "invalid_fraction": invalid / n if n else 0.0,
  }


def bleu(targets: Sequence[str], predictions: Sequence[str],
         max_order: int = 4) -> Dict[str, float]:
  """Corpus BLEU-n (sacrebleu, 13a tokenization, exponential smoothing), 0..100."""
  import sacrebleu
  _check_lengths(targets, predictions)
  metric = sacrebleu.metrics.BLEU(max_ngram_order=max_order)
  score = metric.corpus_score(list(predictions), [list(targets)])
  return {f"bleu{max_order}": float(score.score)}


def rouge(targets: Sequence[str], predictions: Sequence[str],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> Dict[str, float]:
  """Mean ROUGE F1 x 100 (rouge-score, Porter stemming)."""
  from rouge_score import rouge_scorer
  _check_lengths(targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
  totals = {t: 0.0 for t in types}
  for t, p in zip(targets, predictions):
    scores = scorer.score(t, p)
    for name in types:
      totals[name] += scores[name].fmeasure
  n = max(len(targets), 1)
  return {name: 100.0 * total / n for name, total in totals.items()}


bleu4 = functools.partial(bleu, max_order=4)
bleu2 = functools.partial(bleu, max_order=2)


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  """Exact-match accuracy after lower-casing and stripping, x 100."""
  _check_lengths(targets, predictions)
  if not targets:
    return {"accuracy": 0.0}
  norm = lambda s: str(s).strip().lower()
  return {"accuracy": 100.0 * float(np.mean(
      [norm(t) == norm(p) for t, p in zip(targets, predictions)]))}


def positive_probability(prediction: str, log_likelihood: float) -> float:
  """P("yes") from a decoded answer and its log-likelihood.

  The model's own probability of its answer `p` is exp(log_likelihood); when
  the answer is negative the positive class gets 1 - p, and an answer that is
  neither gets 0.5 (no information).
  """
  p = float(np.exp(min(log_likelihood, 0.0)))
  answer = str(prediction).strip().lower()
  if answer in POSITIVE_ANSWERS:
    return p
  if answer in NEGATIVE_ANSWERS:
    return 1.0 - p
  return 0.5


def yes_no_auc(targets: Sequence[str], predictions: Sequence[str],
               aux_values: Optional[Mapping[str, Any]]) -> Dict[str, float]:
  """ROC AUC of yes/no answers (scikit-learn), x 100.

  With ``aux_values["scores"]`` (per-example log-likelihood of the decoded
  answer, as `predict_batch_with_aux` returns) the scores rank examples; else
  the hard answers do (AUC then equals balanced accuracy). NaN if only one
  class is present among the targets.
  """
  from sklearn.metrics import roc_auc_score
  _check_lengths(targets, predictions)
  labels = [str(t).strip().lower() in POSITIVE_ANSWERS for t in targets]
  if len(set(labels)) < 2:
    return {"auc": float("nan")}
  scores = (aux_values or {}).get("scores")
  if scores is None:
    probs = [positive_probability(p, 0.0) for p in predictions]
  else:
    scores = np.asarray(scores, dtype=np.float64).reshape(len(predictions), -1)[:, -1]
    probs = [positive_probability(p, s) for p, s in zip(predictions, scores)]
  return {"auc": 100.0 * float(roc_auc_score(labels, probs))}


def _check_lengths(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
