"""Personalized prompt templates for the five P5 families, as data.

Each `PromptTemplate` has P5's id ("2-13"), its family, an input and a target
format string, and whether it is *seen* (used in training mixtures) or *unseen*
(held out for zero-shot evaluation: 1-10, 2-13, 3-12, 4-4, 5-8). The wording is
this project's own; what each prompt carries and predicts follows P5.

Format strings use `str.format` fields. Two kinds of fields exist:

* Dataset wording, fixed when a template is specialized for a dataset
  (`specialize`): ``{item_noun}`` ("movie"), ``{item_nouns}`` ("movies"),
  ``{interacted}`` ("watched"), ``{interact}`` ("watch").
* Example fields, filled per example by `tasks.preprocessors` (see
  `EXAMPLE_FIELDS`). ``user_desc`` is the user's display name when the data has
  one, else ``user_<id>``; item-prediction targets are bare ids ("7391").

A template whose fields a dataset cannot fill (e.g. ``review_text`` on
MovieLens) belongs to a family that dataset does not register
(`schema.DATASETS[name].families`). Optional per-example fields
(`OPTIONAL_FIELDS`: a title, a feature word, ...) may be empty for single
examples; such a template is then not applicable to that example.
"""
import dataclasses
import string
from typing import Dict, Iterator, List, Mapping, Tuple

from p5jax.data import schema

# Answer kinds; they pick the postprocessor and the metrics of a prompt.
RATING = "rating"            # "4.0"
YES_NO = "yes_no"            # "yes" / "no"
LIKE_DISLIKE = "like_dislike"  # "like" / "dislike"
ITEM = "item"                # bare item id, "7391"
TEXT = "text"                # a sentence
KINDS = (RATING, YES_NO, LIKE_DISLIKE, ITEM, TEXT)

# Fields each family's preprocessor fills (scalar tf.string per example).
EXAMPLE_FIELDS = {
    "rating": ("user_id", "user_desc", "item_id", "item_title", "rating",
               "star", "yes_no", "like_dislike"),
    "sequential": ("user_id", "user_desc", "history", "history_arrow",
                   "candidates", "target_item", "query_item", "yes_no"),
    "explanation": ("user_id", "user_desc", "item_id", "item_title",
                    "explanation", "feature", "star"),
    "review": ("user_id", "user_desc", "item_id", "item_title", "review_text",
               "summary", "rating"),
    "direct": ("user_id", "user_desc", "candidates", "target_item",
               "query_item", "yes_no"),
}
# Fields that can be "" for a single example (the template then does not apply).
OPTIONAL_FIELDS = frozenset(
    {"item_title", "feature", "review_text", "summary", "explanation"})
WORDING_FIELDS = ("item_noun", "item_nouns", "interacted", "interact")


@dataclasses.dataclass(frozen=True)
class Wording:
  """Dataset-specific words substituted into templates."""
  item_noun: str
  item_nouns: str
  interacted: str
  interact: str


WORDINGS = {
    "movielens": Wording("movie", "movies", "watched", "watch"),
    "amazon": Wording("item", "items", "purchased", "buy"),
    "yelp": Wording("business", "businesses", "visited", "visit"),
    "p5": Wording("item", "items", "purchased", "buy"),
}


def wording_for(dataset: str) -> Wording:
  return WORDINGS[schema.DATASETS[dataset].source]


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """One prompt: P5 id, family, input/target format strings, seen or unseen."""
  id: str          # P5 numbering, e.g. "2-13"
  family: str      # one of schema.FAMILIES
  inputs: str      # format string of the prompt
  targets: str     # format string of the answer
  kind: str        # answer kind, one of KINDS
  seen: bool = True

  @property
  def name(self) -> str:
    """Task-name suffix: "2-13" -> "2_13"."""
    return self.id.replace("-", "_")

  @property
  def fields(self) -> Tuple[str, ...]:
    """Example fields (not wording fields) used by inputs or targets, in order."""
    out = []
    for fmt in (self.inputs, self.targets):
      for _, field, _, _ in string.Formatter().parse(fmt):
        if field is not None and field not in WORDING_FIELDS and field not in out:
          out.append(field)
    return tuple(out)

  @property
  def required_fields(self) -> Tuple[str, ...]:
    """Fields that must be non-empty in an example for this template to apply."""
    return tuple(f for f in self.fields if f in OPTIONAL_FIELDS)

  def specialize(self, wording: Wording) -> "PromptTemplate":
    """Returns the template with the dataset wording filled in."""
    words = dataclasses.asdict(wording)

    def fill(fmt):
      # Keep example fields as "{field}"; substitute only wording fields.
      parts = []
      for literal, field, spec, conv in string.Formatter().parse(fmt):
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
          continue
        if field in words:
          parts.append(words[field])
        else:
          parts.append("{" + field + (f"!{conv}" if conv else "") +
                       (f":{spec}" if spec else "") + "}")
      return "".join(parts)

    return dataclasses.replace(self, inputs=fill(self.inputs),
                               targets=fill(self.targets))

  def render(self, **fields: str) -> Tuple[str, str]:
    """Renders (inputs, targets) in Python; the reference for the TF renderer."""
    return self.inputs.format(**fields), self.targets.format(**fields)

  def chunks(self, which: str) -> List[Tuple[str, str]]:
    """[(literal, field or "")] pieces of `inputs` or `targets` for rendering."""
    fmt = self.inputs if which == "inputs" else self.targets
    out = []
    for literal, field, spec, conv in string.Formatter().parse(fmt):
      if spec or conv:
        raise ValueError(f"template {self.id}: format specs are not supported "
                         f"({field!r})")
      out.append((literal, field or ""))
    return out


def _t(tid, family, inputs, targets, kind, seen=True):
  return PromptTemplate(tid, family, inputs, targets, kind, seen)


_RATING = (
    _t("1-1", "rating",
       "What star rating, from 1 to 5, would user_{user_id} give to "
       "item_{item_id}?", "{rating}", RATING),
    _t("1-2", "rating",
       "On a scale of 1 to 5 stars, how would user_{user_id} score the "
       "{item_noun} titled \"{item_title}\"?", "{rating}", RATING),
    _t("1-3", "rating",
       "Is user_{user_id} going to rate item_{item_id} with "
       "{star} stars? Answer yes or no.", "{yes_no}", YES_NO),
    _t("1-4", "rating",
       "Would user_{user_id} like or dislike item_{item_id}?",
       "{like_dislike}", LIKE_DISLIKE),
    _t("1-5", "rating",
       "Estimate the score (1 to 5) that user_{user_id} assigns to item_{item_id}, "
       "the {item_noun} \"{item_title}\".", "{rating}", RATING),
    _t("1-6", "rating",
       "Guess how many stars {user_desc} gives item_{item_id}.",
       "{rating}", RATING),
    _t("1-7", "rating",
       "{user_desc} is rating \"{item_title}\". How many stars, 1 to 5, "
       "will the score be?", "{rating}", RATING),
    _t("1-8", "rating",
       "Will {user_desc} award \"{item_title}\" a {star}-star rating? "
       "Reply yes or no.", "{yes_no}", YES_NO),
    _t("1-9", "rating",
       "Does {user_desc} enjoy the {item_noun} \"{item_title}\"? "
       "Reply like or dislike.", "{like_dislike}", LIKE_DISLIKE),
    _t("1-10", "rating",
       "Predict the rating {user_desc} would assign to \"{item_title}\" "
       "(item_{item_id}), between 1 and 5 stars.", "{rating}", RATING,
       seen=False),
)

_SEQUENTIAL = (
    _t("2-1", "sequential",
       "Here are the {item_nouns} user_{user_id} {interacted} in order: "
       "{history} . Which {item_noun} comes next?", "{target_item}", ITEM),
    _t("2-2", "sequential",
       "user_{user_id} has {interacted} {history_arrow} . Recommend the next "
       "{item_noun} for this user.", "{target_item}", ITEM),
    _t("2-3", "sequential",
       "Interaction sequence of user_{user_id}: {history} . Predict the "
       "{item_noun} this user will {interact} next.", "{target_item}", ITEM),
    _t("2-4", "sequential",
       "Given that {user_desc} {interacted} {history_arrow} , name the next "
       "{item_noun}.", "{target_item}", ITEM),
    _t("2-5", "sequential",
       "Chronological history of {user_desc}: {history} . Which {item_noun} "
       "will follow?", "{target_item}", ITEM),
    _t("2-6", "sequential",
       "{user_desc} went through {history_arrow} . Suggest one more "
       "{item_noun}.", "{target_item}", ITEM),
    _t("2-7", "sequential",
       "user_{user_id} {interacted} {history} . Pick the next {item_noun} for "
       "this user from these candidates: {candidates}", "{target_item}", ITEM),
    _t("2-8", "sequential",
       "History of user_{user_id}: {history_arrow} . Choose the next "
       "{item_noun} from the list {candidates}", "{target_item}", ITEM),
    _t("2-9", "sequential",
       "{user_desc} has {interacted} {history} . Which one of the following "
       "should come next? {candidates}", "{target_item}", ITEM),
    _t("2-10", "sequential",
       "Given that {user_desc} {interacted} {history_arrow} , select the best "
       "next {item_noun} among {candidates}", "{target_item}", ITEM),
    _t("2-11", "sequential",
       "user_{user_id} {interacted} {history} . Should item_{query_item} be "
       "recommended next? Answer yes or no.", "{yes_no}", YES_NO),
    _t("2-12", "sequential",
       "{user_desc} has this history: {history_arrow} . Is item_{query_item} "
       "a good next {item_noun} for them? Reply yes or no.", "{yes_no}",
       YES_NO),
    _t("2-13", "sequential",
       "Based on the {item_nouns} user_{user_id} {interacted} so far "
       "( {history} ), forecast the {item_noun} they will choose next.",
       "{target_item}", ITEM, seen=False),
)

_EXPLANATION = (
    _t("3-1", "explanation",
       "Explain why user_{user_id} feels the way they do about "
       "item_{item_id}.", "{explanation}", TEXT),
    _t("3-2", "explanation",
       "Write the explanation {user_desc} would give for a {star}-star rating "
       "of \"{item_title}\".", "{explanation}", TEXT),
    _t("3-3", "explanation",
       "Give the reasoning of {user_desc} about the {item_noun} "
       "\"{item_title}\".", "{explanation}", TEXT),
    _t("3-4", "explanation",
       "Using the word \"{feature}\", explain the opinion of user_{user_id} on "
       "item_{item_id}.", "{explanation}", TEXT),
    _t("3-5", "explanation",
       "Mention \"{feature}\" and explain what {user_desc} thinks of "
       "\"{item_title}\".", "{explanation}", TEXT),
    _t("3-6", "explanation",
       "Around the aspect \"{feature}\", explain the view of {user_desc} on "
       "item_{item_id}.", "{explanation}", TEXT),
    _t("3-7", "explanation",
       "user_{user_id} rated item_{item_id} {star} stars. Explain the rating.",
       "{explanation}", TEXT),
    _t("3-8", "explanation",
       "{user_desc} gave \"{item_title}\" {star} stars. Why?",
       "{explanation}", TEXT),
    _t("3-9", "explanation",
       "user_{user_id} rated item_{item_id} {star} stars; explain it using the "
       "word \"{feature}\".", "{explanation}", TEXT),
    _t("3-10", "explanation",
       "{user_desc} gave {star} stars to \"{item_title}\" and mentions "
       "\"{feature}\". Write the explanation.", "{explanation}", TEXT),
    _t("3-11", "explanation",
       "Given the feature \"{feature}\" and a {star}-star rating, explain what "
       "user_{user_id} thinks of \"{item_title}\".", "{explanation}", TEXT),
    _t("3-12", "explanation",
       "Produce a one-sentence justification from user_{user_id} for "
       "item_{item_id} that mentions \"{feature}\".", "{explanation}", TEXT,
       seen=False),
)

_REVIEW = (
    _t("4-1", "review",
       "Summarize in a few words the review user_{user_id} wrote about "
       "item_{item_id}: {review_text}", "{summary}", TEXT),
    _t("4-2", "review",
       "What star rating goes with this review by user_{user_id}? Review: "
       "{review_text}", "{rating}", RATING),
    _t("4-3", "review",
       "Give a short title for the review {user_desc} wrote on "
       "\"{item_title}\": {review_text}", "{summary}", TEXT),
    _t("4-4", "review",
       "Infer the star rating, 1 to 5, from the review user_{user_id} left for "
       "item_{item_id}: {review_text}", "{rating}", RATING, seen=False),
)

_DIRECT = (
    _t("5-1", "direct",
       "Will user_{user_id} {interact} item_{query_item}? Answer yes or no.",
       "{yes_no}", YES_NO),
    _t("5-2", "direct",
       "Should we suggest item_{query_item} to user_{user_id}? Reply yes or no.",
       "{yes_no}", YES_NO),
    _t("5-3", "direct",
       "Is item_{query_item} a good match for {user_desc}? Reply yes or no.",
       "{yes_no}", YES_NO),
    _t("5-4", "direct",
       "Would {user_desc} enjoy item_{query_item}? "
       "Answer yes or no.", "{yes_no}", YES_NO),
    _t("5-5", "direct",
       "Pick the best {item_noun} for user_{user_id} from these candidates: "
       "{candidates}", "{target_item}", ITEM),
    _t("5-6", "direct",
       "Which of these {item_nouns} should {user_desc} {interact} next? "
       "{candidates}", "{target_item}", ITEM),
    _t("5-7", "direct",
       "Choose one {item_noun} to recommend to user_{user_id} among: "
       "{candidates}", "{target_item}", ITEM),
    _t("5-8", "direct",
       "Select the {item_noun} that {user_desc} is most likely to {interact}, "
       "from {candidates}", "{target_item}", ITEM, seen=False),
)

ALL_TEMPLATES: Tuple[PromptTemplate, ...] = (
    _RATING + _SEQUENTIAL + _EXPLANATION + _REVIEW + _DIRECT)
TEMPLATES: Dict[str, PromptTemplate] = {t.id: t for t in ALL_TEMPLATES}
UNSEEN_IDS = tuple(t.id for t in ALL_TEMPLATES if not t.seen)


def family_templates(family: str, seen: bool = None) -> Tuple[PromptTemplate, ...]:
  """Templates of `family` in P5 order; `seen` True/False filters, None = all."""
  return tuple(t for t in ALL_TEMPLATES if t.family == family and
               (seen is None or t.seen == seen))


def dataset_templates(dataset: str, family: str,
                      seen: bool = None) -> Tuple[PromptTemplate, ...]:
  """`family_templates` specialized with the wording of `dataset`."""
  if family not in schema.DATASETS[dataset].families:
    raise ValueError(f"dataset {dataset!r} has no {family!r} family "
                     f"(families: {schema.DATASETS[dataset].families})")
  w = wording_for(dataset)
  return tuple(t.specialize(w) for t in family_templates(family, seen))


# Sample values used to render every template for vocabulary training, so that
# template words are frequent pieces in each dataset's SentencePiece model.
_SAMPLE_VALUES = {
    "user_desc": "user_{u}", "rating": "{r}.0", "star": "{r}",
    "yes_no": "yes", "like_dislike": "like",
    "item_title": "", "feature": "", "review_text": "", "summary": "",
    "explanation": "",
}


def sample_prompt_texts(dataset: str, n_per_template: int = 20,
                        titles=(), seed: int = 0) -> Iterator[str]:
  """Renders every template of `dataset` with synthetic ids (for vocab corpora).

  Optional text fields come from `titles` when given (else a placeholder word);
  the text of reviews itself is added to the corpus by the vocabulary builder.
  """
  import random
  rng = random.Random(seed)
  titles = list(titles) or ["Untitled"]
  for family in schema.DATASETS[dataset].families:
    for t in dataset_templates(dataset, family):
      for _ in range(n_per_template):
        u, r = rng.randint(1, 9999), rng.randint(1, 5)
        items = [str(rng.randint(1, 99999)) for _ in range(rng.randint(2, 8))]
        values = {k: v.format(u=u, r=r) for k, v in _SAMPLE_VALUES.items()}
        values.update(
            user_id=str(u), item_id=items[0], target_item=items[0],
            query_item=items[1], history=" , ".join(items),
            history_arrow=" -> ".join(items), candidates=" , ".join(items),
            item_title=rng.choice(titles), feature="quality",
            review_text="review", summary="summary", explanation="because",
            yes_no=rng.choice(("yes", "no")),
            like_dislike=rng.choice(("like", "dislike")))
        inputs, targets = t.render(**values)
        yield inputs
        yield targets


def check_templates(templates: Mapping[str, PromptTemplate] = None) -> None:
  """Raises ValueError if a template uses a field its family does not fill."""
  for t in (templates or TEMPLATES).values():
    unknown = set(t.fields) - set(EXAMPLE_FIELDS[t.family])
    if unknown:
      raise ValueError(f"template {t.id} ({t.family}) uses unknown fields "
                       f"{sorted(unknown)}; known: {EXAMPLE_FIELDS[t.family]}")
    if t.kind not in KINDS:
      raise ValueError(f"template {t.id}: unknown kind {t.kind!r}")


check_templates()
