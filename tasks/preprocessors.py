"""Render personalized prompts from prepared P5 data, one function per family.

Input examples are the TFDS features of `p5jax.data.schema` (``reviews`` for
rating / explanation / review, ``sequential`` for sequential / direct). Output
examples have string ``inputs`` and ``targets`` (tokenized later by SeqIO),
``user_id``, and for sequential / direct evaluation the stored ``candidates``
(the evaluator can use them to rank or constrain decoding).

Training (``train=True``): each example gets a template drawn uniformly from
the family's templates that apply to it, plus the per-example randomness P5
uses (sequential: a random end position in the training history every epoch;
sampled candidates and yes/no negatives). All randomness comes from SeqIO's
per-example seeds (`seqio.map_over_dataset(num_seeds=1)`), so a pipeline is
reproducible given the seed passed to `Task.get_dataset`, and differs between
epochs because SeqIO applies these preprocessors after `repeat`.

Evaluation (``train=False``): one fixed template per task and no random seeds:
the leave-one-out `target`/`candidates` of the split are used as stored, and
the choice of positive vs. negative yes/no question (and of the wrong star for
rating yes/no prompts) is a hash of the example's ids, identical in every run.

No training example sees held-out items: sequential targets are drawn from the
train ``history`` (which excludes the validation and test items), candidates
and negatives from ``negatives`` (items the user never touched).
"""
import dataclasses
import functools
from typing import Dict, Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from p5jax.data import schema
from tasks import templates as templates_lib

PromptTemplate = templates_lib.PromptTemplate


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Knobs of prompt rendering (bind with gin: ``PromptConfig.max_history = 10``).

  Attributes:
    max_history: most recent history items shown in sequential prompts.
    num_train_candidates: candidate list size (target included) for training
      candidate prompts (2-7..2-10, 5-5..5-8); evaluation uses the stored 100.
    max_review_words: review text is cut to this many words in prompts.
    positive_rate: probability of the positive question in yes/no prompts.
    like_threshold: ratings >= this are "like" in like/dislike prompts.
  """
  max_history: int = 20
  num_train_candidates: int = 100
  max_review_words: int = 128
  positive_rate: float = 0.5
  like_threshold: float = 4.0


def _config(config: Optional[PromptConfig]) -> PromptConfig:
  # Instantiated at dataset-build time so gin bindings made after task
  # registration still apply.
  return config if config is not None else PromptConfig()


# ------------------------------------------------------------------ rendering


def render(template: PromptTemplate, fields: Mapping[str, tf.Tensor],
           which: str = "inputs") -> tf.Tensor:
  """Scalar tf.string: `template`'s inputs or targets with `fields` filled in."""
  parts = []
  for literal, field in template.chunks(which):
    if literal:
      parts.append(tf.constant(literal))
    if field:
      parts.append(fields[field])
  return tf.strings.join(parts) if parts else tf.constant("")


def _applicable(template: PromptTemplate, fields: Mapping[str, tf.Tensor]) -> tf.Tensor:
  ok = tf.constant(True)
  for f in template.required_fields:
    ok = tf.logical_and(ok, tf.strings.length(fields[f]) > 0)
  return ok


def render_any(templates: Sequence[PromptTemplate], fields: Mapping[str, tf.Tensor],
               seed: Optional[tf.Tensor]) -> Dict[str, tf.Tensor]:
  """Renders one template: uniformly drawn among applicable ones, or the first.

  Returns inputs, targets and ``valid`` (False when no template applies).
  """
  ok = tf.stack([_applicable(t, fields) for t in templates])
  if len(templates) == 1 or seed is None:
    index = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  else:
    logits = tf.where(ok, 0.0, -1e9)[tf.newaxis]
    index = tf.cast(tf.random.stateless_categorical(logits, 1, seed)[0, 0],
                    tf.int32)
  inputs = tf.stack([render(t, fields, "inputs") for t in templates])
  targets = tf.stack([render(t, fields, "targets") for t in templates])
  return {"inputs": inputs[index], "targets": targets[index],
          "valid": tf.reduce_any(ok)}


# ------------------------------------------------------------------- helpers


def item_renderer(source: Optional[str]):
  """item id strings -> their prompt text, decided by `source`'s manifest.

  Called when a pipeline is built (the data root is known by then): bare ids
  ("7391"), or item tokens ("<i7391>") for data prepared with item tokens.
  """
  if source and schema.uses_item_tokens(source):
    return lambda ids: tf.strings.join(
        [schema.ITEM_TOKEN_PREFIX, ids, schema.ITEM_TOKEN_SUFFIX])
  return lambda ids: ids


def _user_desc(ex) -> tf.Tensor:
  name = tf.strings.strip(ex["user_name"])
  return tf.where(tf.strings.length(name) > 0, name,
                  tf.strings.join(["user_", ex["user_id"]]))


def _join(items: tf.Tensor, sep: str) -> tf.Tensor:
  return tf.strings.reduce_join(items, separator=sep)


def _seeds(seed, n):
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _uniform(seed) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, dtype=tf.float32)


def _randint(seed, maxval) -> tf.Tensor:
  """Uniform int32 in [0, maxval); maxval >= 1."""
  return tf.random.stateless_uniform([], seed, minval=0, maxval=maxval,
                                     dtype=tf.int32)


def _shuffle(items: tf.Tensor, seed) -> tf.Tensor:
  order = tf.argsort(tf.random.stateless_uniform(tf.shape(items), seed))
  return tf.gather(items, order)


def _hash(*parts: tf.Tensor, salt: str = "") -> tf.Tensor:
  """Deterministic non-negative int64 from strings (for seedless eval choices)."""
  key = tf.strings.join([tf.constant(salt)] + list(parts), separator="|")
  return tf.strings.to_hash_bucket_fast(key, 1 << 30)


def _finish(ex, rendered, extra: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  out = {"inputs": rendered["inputs"], "targets": rendered["targets"],
         "user_id": ex["user_id"], "_valid": rendered["valid"]}
  out.update(extra)
  return out


def _drop_invalid(ds: tf.data.Dataset) -> tf.data.Dataset:
  ds = ds.filter(_plain(lambda ex: ex["_valid"]))
  return ds.map(_plain(lambda ex: {k: v for k, v in ex.items() if k != "_valid"}),
                num_parallel_calls=tf.data.AUTOTUNE)


# The map functions have no data-dependent Python control flow, so AutoGraph
# conversion is skipped: it only slows down building each task's pipeline.
_plain = tf.autograph.experimental.do_not_convert


def _map(ds, fn, train: bool):
  """Maps fn(ex, seed) with SeqIO seeds in training, fn(ex, None) otherwise."""
  if train:
    @seqio.map_over_dataset(num_seeds=1)
    @_plain
    def seeded(ex, seed):
      return fn(ex, seed)
    return seeded(ds)
  return ds.map(_plain(lambda ex: fn(ex, None)), num_parallel_calls=tf.data.AUTOTUNE)


def _star_question(rating_int: tf.Tensor, seed, key: tf.Tensor, positive_rate: float):
  """A star value to ask about: the true one with `positive_rate`, else another."""
  if seed is None:
    h = _hash(key, salt="star")
    positive = tf.equal(h % 2, 0)
    other = tf.cast((h // 2) % 4, tf.int32) + 1
  else:
    s1, s2 = _seeds(seed, 2)
    positive = _uniform(s1) < positive_rate
    other = _randint(s2, 4) + 1
  other = tf.where(other >= rating_int, other + 1, other)  # skip the true star
  return tf.where(positive, rating_int, other)


# ----------------------------------------------------------- review families


def _rating_fields(ex, config: PromptConfig, item) -> Dict[str, tf.Tensor]:
  rating = tf.cast(ex["rating"], tf.float32)
  return {
      "user_id": ex["user_id"], "user_desc": _user_desc(ex),
      "item_id": item(ex["item_id"]), "item_title": tf.strings.strip(ex["item_title"]),
      "rating": tf.strings.as_string(rating, precision=1),
      "rating_int": tf.clip_by_value(tf.cast(tf.round(rating), tf.int32), 1, 5),
      "like_dislike": tf.where(rating >= config.like_threshold, "like", "dislike"),
  }


def rating_prompts(dataset: tf.data.Dataset, templates: Sequence[PromptTemplate],
                   train: bool, config: Optional[PromptConfig] = None,
    source: Optional[str] = None) -> tf.data.Dataset:
  """Family 1: star rating, yes/no for a star value, like/dislike."""
  config = _config(config)
  item = item_renderer(source)

  def fn(ex, seed):
    f = _rating_fields(ex, config, item)
    s_template, s_star = _seeds(seed, 2) if seed is not None else (None, None)
    star = _star_question(f["rating_int"], s_star,
                          tf.strings.join([ex["user_id"], ex["item_id"]], "|"),
                          config.positive_rate)
    f["star"] = tf.strings.as_string(star)
    f["yes_no"] = tf.where(tf.equal(star, f["rating_int"]), "yes", "no")
    return _finish(ex, render_any(templates, f, s_template),
                   {"item_id": ex["item_id"]})

  return _drop_invalid(_map(dataset, fn, train))


def explanation_prompts(dataset: tf.data.Dataset, templates: Sequence[PromptTemplate],
                        train: bool, config: Optional[PromptConfig] = None,
    source: Optional[str] = None) -> tf.data.Dataset:
  """Family 3: explanation sentence, optionally given a feature word / star."""
  config = _config(config)
  item = item_renderer(source)
  dataset = dataset.filter(
      lambda ex: tf.strings.length(tf.strings.strip(ex["explanation"])) > 0)

  def fn(ex, seed):
    f = _rating_fields(ex, config, item)
    f["star"] = tf.strings.as_string(f["rating_int"])
    f["explanation"] = tf.strings.strip(ex["explanation"])
    f["feature"] = tf.strings.strip(ex["feature"])
    return _finish(ex, render_any(templates, f, seed), {"item_id": ex["item_id"]})

  return _drop_invalid(_map(dataset, fn, train))


def _truncate_words(text: tf.Tensor, max_words: int) -> tf.Tensor:
  words = tf.strings.split(tf.strings.strip(text))
  return tf.strings.reduce_join(words[:max_words], separator=" ")


def review_prompts(dataset: tf.data.Dataset, templates: Sequence[PromptTemplate],
                   train: bool, config: Optional[PromptConfig] = None,
    source: Optional[str] = None) -> tf.data.Dataset:
  """Family 4: review summary, or rating from review text."""
  config = _config(config)
  item = item_renderer(source)

  def fn(ex, seed):
    f = _rating_fields(ex, config, item)
    f["review_text"] = _truncate_words(ex["review_text"], config.max_review_words)
    f["summary"] = tf.strings.strip(ex["summary"])
    return _finish(ex, render_any(templates, f, seed), {"item_id": ex["item_id"]})

  return _drop_invalid(_map(dataset, fn, train))


# ------------------------------------------------------- sequential families


def _sample_candidates(target: tf.Tensor, negatives: tf.Tensor, size: int, seed):
  """`size` - 1 distinct negatives plus the target, shuffled ([<=size] string)."""
  s1, s2 = _seeds(seed, 2)
  picked = _shuffle(negatives, s1)[:max(size - 1, 0)]
  return _shuffle(tf.concat([picked, target[tf.newaxis]], 0), s2)


def _yes_no_query(target, negatives, candidates, seed, key, positive_rate):
  """(query item, "yes"/"no"): the target or a non-target item."""
  if seed is None:
    # Eval: the stored candidates are shuffled once at prepare time, so the
    # first non-target candidate is a random negative; hash picks yes or no.
    pool = tf.boolean_mask(candidates, tf.not_equal(candidates, target))
    pool = tf.concat([pool, negatives], 0)
    positive = tf.equal(_hash(key, salt="query") % 2, 0)
    index = tf.constant(0)
  else:
    pool = negatives
    s1, s2 = _seeds(seed, 2)
    positive = _uniform(s1) < positive_rate
    index = _randint(s2, tf.maximum(tf.size(pool), 1))
  has_negative = tf.size(pool) > 0
  positive = tf.logical_or(positive, tf.logical_not(has_negative))
  negative = tf.cond(has_negative, lambda: pool[index], lambda: target)
  return tf.where(positive, target, negative), tf.where(positive, "yes", "no")


def _sequence_fields(ex, history, target, candidates, query, answer):
  return {
      "user_id": ex["user_id"], "user_desc": _user_desc(ex),
      "history": _join(history, " , "), "history_arrow": _join(history, " -> "),
      "candidates": _join(candidates, " , "), "target_item": target,
      "query_item": query, "yes_no": answer,
  }


def sequential_prompts(dataset: tf.data.Dataset, templates: Sequence[PromptTemplate],
                       train: bool, config: Optional[PromptConfig] = None,
    source: Optional[str] = None) -> tf.data.Dataset:
  """Family 2: next item, pick from candidates, yes/no for a next item.

  Training: per user and epoch a random end position ``t`` in the train
  history ``h`` (``1 <= t < len(h)``): the prompt shows ``h[t-max_history:t]``
  and the target is ``h[t]`` -- at latest the third-to-last item of the
  user's full sequence, since ``h`` excludes the last two.
  Evaluation: ``history`` (last `max_history`), ``target`` and ``candidates``
  of the split as stored.
  """
  config = _config(config)
  item = item_renderer(source)
  if train:
    dataset = dataset.filter(lambda ex: tf.size(ex["history"]) >= 2)
  else:
    dataset = dataset.filter(
        lambda ex: tf.logical_and(tf.strings.length(ex["target"]) > 0,
                                  tf.size(ex["history"]) >= 1))

  def fn(ex, seed):
    negatives = ex["negatives"]
    if seed is not None:
      s_end, s_cand, s_query, s_template = _seeds(seed, 4)
      history_all = ex["history"]
      end = _randint(s_end, tf.size(history_all) - 1) + 1
      target = history_all[end]
      history = history_all[tf.maximum(0, end - config.max_history):end]
      candidates = _sample_candidates(target, negatives,
                                      config.num_train_candidates, s_cand)
    else:
      s_query = s_template = None
      target = ex["target"]
      history = ex["history"][-config.max_history:]
      candidates = ex["candidates"]
    query, answer = _yes_no_query(target, negatives, candidates, s_query,
                                  ex["user_id"], config.positive_rate)
    f = _sequence_fields(ex, item(history), item(target), item(candidates),
                         item(query), answer)
    extra = {} if train else {"candidates": ex["candidates"]}
    return _finish(ex, render_any(templates, f, s_template), extra)

  return _drop_invalid(_map(dataset, fn, train))


def direct_prompts(dataset: tf.data.Dataset, templates: Sequence[PromptTemplate],
                   train: bool, config: Optional[PromptConfig] = None,
    source: Optional[str] = None) -> tf.data.Dataset:
  """Family 5: yes/no for one item, or the best item among candidates.

  Training: the positive is a random item of the train history; negatives and
  candidates come from ``negatives``. Evaluation: the split's ``target`` and
  its stored 100 ``candidates``.
  """
  config = _config(config)
  item = item_renderer(source)
  if train:
    dataset = dataset.filter(lambda ex: tf.size(ex["history"]) >= 1)
  else:
    dataset = dataset.filter(lambda ex: tf.strings.length(ex["target"]) > 0)

  def fn(ex, seed):
    negatives = ex["negatives"]
    if seed is not None:
      s_pos, s_cand, s_query, s_template = _seeds(seed, 4)
      target = ex["history"][_randint(s_pos, tf.size(ex["history"]))]
      candidates = _sample_candidates(target, negatives,
                                      config.num_train_candidates, s_cand)
    else:
      s_query = s_template = None
      target = ex["target"]
      candidates = ex["candidates"]
    query, answer = _yes_no_query(target, negatives, candidates, s_query,
                                  ex["user_id"], config.positive_rate)
    f = {"user_id": ex["user_id"], "user_desc": _user_desc(ex),
         "candidates": _join(item(candidates), " , "), "target_item": item(target),
         "query_item": item(query), "yes_no": answer}
    extra = {} if train else {"candidates": ex["candidates"]}
    return _finish(ex, render_any(templates, f, s_template), extra)

  return _drop_invalid(_map(dataset, fn, train))


FAMILY_PREPROCESSORS = {
    "rating": rating_prompts,
    "sequential": sequential_prompts,
    "explanation": explanation_prompts,
    "review": review_prompts,
    "direct": direct_prompts,
}


def family_preprocessor(family: str, templates: Sequence[PromptTemplate],
                        train: bool, config: Optional[PromptConfig] = None,
                        source: Optional[str] = None):
  """The family's preprocessor bound to `templates` (a SeqIO preprocessor).

  `source` is the prepared dataset key; its manifest decides how items are
  written (`item_renderer`). None = bare ids.
  """
  templates = tuple(templates)
  bad = [t.id for t in templates if t.family != family]
  if bad or not templates:
    raise ValueError(f"templates {bad or '()'} are not {family!r} templates")
  return functools.partial(FAMILY_PREPROCESSORS[family], templates=templates,
                           train=train, config=config, source=source)
