"""Tests for tasks.templates: P5 numbering, fields, dataset wording."""
import string

import pytest

from p5jax.data import schema
from tasks import templates


def test_p5_numbering_per_family():
  counts = {"rating": 10, "sequential": 13, "explanation": 12, "review": 4, "direct": 8}
  for family, n in counts.items():
    ids = [t.id for t in templates.family_templates(family)]
    prefix = str(schema.FAMILIES.index(family) + 1)
    assert ids == [f"{prefix}-{i}" for i in range(1, n + 1)]


def test_unseen_prompts():
  assert templates.UNSEEN_IDS == ("1-10", "2-13", "3-12", "4-4", "5-8")
  for family in schema.FAMILIES:
    unseen = templates.family_templates(family, seen=False)
    assert len(unseen) == 1 and not unseen[0].seen


def test_answer_kinds_follow_p5():
  kinds = {t.id: t.kind for t in templates.ALL_TEMPLATES}
  assert kinds["1-1"] == templates.RATING
  assert kinds["1-3"] == kinds["1-8"] == templates.YES_NO
  assert kinds["1-4"] == kinds["1-9"] == templates.LIKE_DISLIKE
  assert all(kinds[f"2-{i}"] == templates.ITEM for i in (1, 2, 3, 4, 5, 6, 13))
  for i in (7, 8, 9, 10):
    assert "candidates" in templates.TEMPLATES[f"2-{i}"].fields
  assert kinds["2-11"] == kinds["2-12"] == templates.YES_NO
  assert {kinds[f"3-{i}"] for i in range(1, 13)} == {templates.TEXT}
  assert kinds["4-1"] == templates.TEXT and kinds["4-4"] == templates.RATING
  assert all(kinds[f"5-{i}"] == templates.YES_NO for i in range(1, 5))
  assert all(kinds[f"5-{i}"] == templates.ITEM for i in range(5, 9))
  for i in range(5, 9):
    assert "candidates" in templates.TEMPLATES[f"5-{i}"].fields


def test_feature_word_and_star_information():
  with_feature = {t.id for t in templates.family_templates("explanation")
                  if "feature" in t.fields}
  assert {"3-4", "3-9", "3-12"} <= with_feature
  assert "feature" not in templates.TEMPLATES["3-1"].fields
  assert "star" in templates.TEMPLATES["3-7"].fields


def test_fields_are_known_and_required_fields_optional():
  templates.check_templates()
  t = templates.TEMPLATES["1-2"]
  assert t.fields == ("user_id", "item_title", "rating")
  assert t.required_fields == ("item_title",)


def test_check_templates_rejects_unknown_field():
  bad = templates.PromptTemplate("9-1", "rating", "{nope}", "{rating}", templates.RATING)
  with pytest.raises(ValueError, match="nope"):
    templates.check_templates({"9-1": bad})


def test_dataset_wording():
  t = templates.dataset_templates("ml100k", "sequential")[0]
  assert "{item_noun" not in t.inputs and "movies" in t.inputs and "watched" in t.inputs
  y = templates.dataset_templates("yelp", "sequential")[0]
  assert "businesses" in y.inputs and "visited" in y.inputs
  inputs, targets = t.render(user_id="23", history="7 , 9", target_item="7391")
  assert inputs == ("Here are the movies user_23 watched in order: 7 , 9 . "
                    "Which movie comes next?")
  assert targets == "7391"


def test_families_a_dataset_lacks_are_refused():
  with pytest.raises(ValueError, match="no 'explanation' family"):
    templates.dataset_templates("ml100k", "explanation")


def test_no_wording_field_left_after_specialize():
  for name in schema.DATASETS:
    for family in schema.DATASETS[name].families:
      for t in templates.dataset_templates(name, family):
        fields = {f for _, f, _, _ in string.Formatter().parse(t.inputs) if f}
        assert not fields & set(templates.WORDING_FIELDS), (name, t.id)


def test_sample_prompt_texts_cover_every_template():
  texts = list(templates.sample_prompt_texts("ml100k", n_per_template=1))
  n = sum(len(templates.family_templates(f)) for f in schema.DATASETS["ml100k"].families)
  assert len(texts) == 2 * n
  assert not any("{" in t for t in texts)
