"""The in-memory form every raw reader produces and `processing` consumes.

Readers (movielens, amazon, yelp, p5_release) only parse and validate; they
never filter, split or index. Keeping one neutral record type means the leak-free
protocol in `processing.py` is written (and tested) once for every source.
"""
import dataclasses
import hashlib
import os
from typing import Dict, List, Optional


@dataclasses.dataclass
class Interaction:
  """One user-item event, with its review when the source has one."""
  user: str             # raw user id, as in the source file
  item: str             # raw item id
  rating: float
  timestamp: int        # seconds since epoch (or an ordinal when unknown)
  row: int              # global 0-based order in the source; the tie-break
  review_text: str = ""
  summary: str = ""
  # Pre-computed by the source (the P5 release ships them); derived otherwise.
  explanation: str = ""
  feature: str = ""


@dataclasses.dataclass
class RawDataset:
  """Everything a reader knows about one dataset, keyed by raw ids."""
  source: str                           # "movielens" | "amazon" | "yelp" | "p5"
  interactions: List[Interaction]
  user_names: Dict[str, str] = dataclasses.field(default_factory=dict)
  item_titles: Dict[str, str] = dataclasses.field(default_factory=dict)
  item_meta: Dict[str, dict] = dataclasses.field(default_factory=dict)
  # basename -> sha256 of every raw file read, recorded in the manifest.
  raw_files: Dict[str, str] = dataclasses.field(default_factory=dict)
  # Extra facts for the manifest (e.g. whether data matches the official one).
  provenance: Dict[str, object] = dataclasses.field(default_factory=dict)
  # The P5 release fixes 99 test negatives per user; None = sample our own.
  fixed_negatives: Optional[Dict[str, List[str]]] = None
  has_explanations: bool = False  # explanation/feature come from the source


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        break
      h.update(b)
  return h.hexdigest()


def record_files(paths) -> Dict[str, str]:
  return {os.path.basename(p): sha256_file(p) for p in paths}
