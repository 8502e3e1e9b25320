"""SeqIO postprocessors: decoded text -> the values `p5jax.metrics` compares.

SeqIO calls ``postprocess_fn(output, example=..., is_target=...)`` on each
decoded target and prediction. A prediction may also be a ranked list of
decodes (best first) for item prompts; lists are postprocessed element-wise.
"""
import re
from typing import Any, List, Union

# "item_7391", "7391", or an item token "<i7391>" (p5jax.data.schema.item_token).
_ITEM = re.compile(r"^(?:item_)?(?:<i(\d+)>|(.*))$", re.DOTALL)


def _text(x: Any) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8", "replace")
  return str(x)


def item_id(output: Union[str, bytes, List[Any]], example=None, is_target=False):
  """"7391" / " item_7391 " / "<i7391>" -> "7391"; a list of decodes -> list of ids."""
  del example, is_target
  if isinstance(output, (list, tuple)):
    return [item_id(o) for o in output]
  match = _ITEM.match(_text(output).strip())
  return match.group(1) or match.group(2)


def rating(output: Any, example=None, is_target=False) -> str:
  """Stripped text; `p5jax.metrics.rating_metrics` parses and counts failures."""
  del example, is_target
  return _text(output).strip()


def answer(output: Any, example=None, is_target=False) -> str:
  """yes/no, like/dislike: lower-cased, stripped, trailing period removed."""
  del example, is_target
  return _text(output).strip().lower().rstrip(".")


def text(output: Any, example=None, is_target=False) -> str:
  """Generated sentence, whitespace-normalized."""
  del example, is_target
  return " ".join(_text(output).split())
