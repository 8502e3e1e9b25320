"""Small raw datasets written in each real on-disk format, for tests.

One synthetic "world" (users with taste groups, items in groups, timestamps
with deliberate ties, review texts) is rendered into every format the data
layer reads, so tests can check readers against each other and other modules'
tests can prepare a realistic dataset in well under a second:

  world = fixtures.make_world()
  raw_dir = fixtures.write_movielens_grouplens(tmp_path / "ml", world)
  prepare.prepare("ml-100k", out_dir, raw_dir=raw_dir)

Writers: `write_movielens_grouplens` (u.data/u.item/u.user),
`write_movielens_recbole` (ml-100k.inter/.item/.user), `write_amazon`
(reviews_<Cat>_5.json.gz + Python-literal meta_<Cat>.json.gz), `write_yelp`
(business.json, review.json, user.json) and `write_p5_release` (P5's folder).
`prepared_root(tmp_dir, dataset=...)` does world + write + prepare in one call.
"""
import dataclasses
import datetime
import gzip
import json
import os
import pickle
import random
from typing import Dict, List, Tuple

ADJECTIVES = ("gentle", "sturdy", "bright", "smooth", "light", "rich", "fresh",
              "compact", "quiet", "durable")
NOUNS = ("scent", "texture", "color", "bottle", "battery", "handle", "fabric",
         "flavor", "screen", "strap", "formula", "finish")
GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance")


@dataclasses.dataclass
class Event:
  user: int
  item: int
  rating: int
  timestamp: int
  review: str
  summary: str


@dataclasses.dataclass
class World:
  num_users: int
  num_items: int
  events: List[Event]          # in "file order"
  titles: Dict[int, str]
  user_names: Dict[int, str]
  item_group: Dict[int, int]


def make_world(num_users: int = 60, num_items: int = 150, min_len: int = 12,
               max_len: int = 24, num_groups: int = 5, seed: int = 0) -> World:
  """Users mostly rate items of their own group; ~1/4 of timestamps tie."""
  rng = random.Random(seed)
  item_group = {i: (i - 1) % num_groups for i in range(1, num_items + 1)}
  by_group = {g: [i for i, gg in item_group.items() if gg == g]
              for g in range(num_groups)}
  events = []
  for u in range(1, num_users + 1):
    g = u % num_groups
    n = rng.randint(min_len, max_len)
    own = rng.sample(by_group[g], min(len(by_group[g]), int(n * 0.75)))
    others = [i for i in range(1, num_items + 1) if item_group[i] != g]
    items = own + rng.sample(others, n - len(own))
    rng.shuffle(items)
    t = 880000000 + rng.randint(0, 10**6)
    for i in items:
      t += rng.choice((0, 0, 60, 3600, 86400))  # zeros -> timestamp ties
      noun = NOUNS[(i * 7) % len(NOUNS)]
      adj = rng.choice(ADJECTIVES)
      review = (f"Great. The {adj} {noun} of this one surprised me. "
                f"I would buy the {noun} again for item {i}!")
      events.append(Event(u, i, rng.randint(1, 5), t, review,
                          f"{adj.title()} {noun}"))
  # File order is not chronological (as in u.data): interleave users.
  rng.shuffle(events)
  titles = {i: f"Thing {i} of group {item_group[i]}" for i in range(1, num_items + 1)}
  names = {u: f"Reviewer{u}" for u in range(1, num_users + 1)}
  return World(num_users, num_items, events, titles, names, item_group)


def _mkdir(path) -> str:
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  return path


def write_movielens_grouplens(folder, world: World) -> str:
  folder = _mkdir(folder)
  with open(os.path.join(folder, "u.data"), "w") as f:
    for e in world.events:
      f.write(f"{e.user}\t{e.item}\t{e.rating}\t{e.timestamp}\n")
  with open(os.path.join(folder, "u.item"), "w", encoding="latin-1") as f:
    for i in range(1, world.num_items + 1):
      flags = ["0"] * 19
      flags[1 + world.item_group[i] % 18] = "1"
      f.write(f"{i}|{world.titles[i]} (1995)|01-Jan-1995||http://x/{i}|"
              + "|".join(flags) + "\n")
  with open(os.path.join(folder, "u.user"), "w") as f:
    for u in range(1, world.num_users + 1):
      f.write(f"{u}|{20 + u % 40}|{'MF'[u % 2]}|student|0{u:04d}\n")
  return folder


def write_movielens_recbole(folder, world: World) -> str:
  folder = _mkdir(folder)
  with open(os.path.join(folder, "ml-100k.inter"), "w") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    for e in world.events:
      f.write(f"{e.user}\t{e.item}\t{e.rating}\t{e.timestamp}\n")
  names = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
           "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
           "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
  with open(os.path.join(folder, "ml-100k.item"), "w") as f:
    f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\t"
            "class:token_seq\n")
    for i in range(1, world.num_items + 1):
      f.write(f"{i}\t{world.titles[i]}\t1995\t{names[1 + world.item_group[i] % 18]}\n")
  with open(os.path.join(folder, "ml-100k.user"), "w") as f:
    f.write("user_id:token\tage:token\tgender:token\toccupation:token\t"
            "zip_code:token\n")
    for u in range(1, world.num_users + 1):
      f.write(f"{u}\t{20 + u % 40}\t{'MF'[u % 2]}\tstudent\t0{u:04d}\n")
  return folder


def asin(i: int) -> str:
  return f"B{i:09d}"


def reviewer(u: int) -> str:
  return f"A{u:06d}XYZ"


def write_amazon(folder, world: World, category: str = "Beauty") -> str:
  folder = _mkdir(folder)
  with gzip.open(os.path.join(folder, f"reviews_{category}_5.json.gz"), "wt") as f:
    for e in world.events:
      day = datetime.datetime.fromtimestamp(e.timestamp, datetime.timezone.utc)
      f.write(json.dumps({
          "reviewerID": reviewer(e.user), "asin": asin(e.item),
          "reviewerName": world.user_names[e.user], "helpful": [0, 0],
          "reviewText": e.review, "overall": float(e.rating),
          "summary": e.summary, "unixReviewTime": e.timestamp,
          "reviewTime": day.strftime("%m %d, %Y")}) + "\n")
  with gzip.open(os.path.join(folder, f"meta_{category}.json.gz"), "wt") as f:
    for i in range(1, world.num_items + 1):
      # repr() of a dict: the 2014 metadata's Python-literal (not JSON) format.
      f.write(repr({"asin": asin(i), "title": world.titles[i],
                    "brand": f"Brand{world.item_group[i]}", "price": 9.99,
                    "categories": [[category, f"Group {world.item_group[i]}"]],
                    "related": {"also_bought": [asin(1)]}}) + "\n")
  return folder


def write_yelp(folder, world: World) -> str:
  folder = _mkdir(folder)
  bid = lambda i: f"biz-{i:05d}-xx"
  uid = lambda u: f"usr-{u:05d}-yy"
  with open(os.path.join(folder, "business.json"), "w") as f:
    for i in range(1, world.num_items + 1):
      f.write(json.dumps({"business_id": bid(i), "name": world.titles[i],
                          "city": "Springfield", "stars": 4.0,
                          "categories": f"Food, Group {world.item_group[i]}"}) + "\n")
  with open(os.path.join(folder, "review.json"), "w") as f:
    for n, e in enumerate(world.events):
      day = datetime.datetime.fromtimestamp(e.timestamp, datetime.timezone.utc)
      f.write(json.dumps({"review_id": f"r{n}", "user_id": uid(e.user),
                          "business_id": bid(e.item), "stars": e.rating,
                          "useful": 0, "text": e.review,
                          "date": day.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
  with open(os.path.join(folder, "user.json"), "w") as f:
    for u in range(1, world.num_users + 1):
      f.write(json.dumps({"user_id": uid(u), "name": world.user_names[u]}) + "\n")
  return folder


def chronological(world: World) -> Dict[int, List[Event]]:
  seqs: Dict[int, List[Tuple[int, int, Event]]] = {}
  for row, e in enumerate(world.events):
    seqs.setdefault(e.user, []).append((e.timestamp, row, e))
  return {u: [e for _, _, e in sorted(s)] for u, s in sorted(seqs.items())}


def kcore(world: World, k: int = 5) -> World:
  """The world restricted to its k-core (the P5 release is already 5-core)."""
  events = world.events
  while True:
    users, items = {}, {}
    for e in events:
      users[e.user] = users.get(e.user, 0) + 1
      items[e.item] = items.get(e.item, 0) + 1
    kept = [e for e in events if users[e.user] >= k and items[e.item] >= k]
    if len(kept) == len(events):
      return dataclasses.replace(world, events=kept)
    events = kept


def write_p5_release(folder, world: World, num_negatives: int = 99,
                     seed: int = 0) -> str:
  """P5's released folder (5-core, P5's own first-appearance indexing)."""
  folder = _mkdir(folder)
  world = kcore(world)
  rng = random.Random(seed)
  seqs = chronological(world)
  user2id, item2id = {}, {}
  for u, s in seqs.items():
    user2id.setdefault(reviewer(u), str(len(user2id) + 1))
    for e in s:
      item2id.setdefault(asin(e.item), str(len(item2id) + 1))
  with open(os.path.join(folder, "datamaps.json"), "w") as f:
    json.dump({"user2id": user2id, "item2id": item2id,
               "id2user": {v: k for k, v in user2id.items()},
               "id2item": {v: k for k, v in item2id.items()}}, f)
  with open(os.path.join(folder, "sequential_data.txt"), "w") as f:
    for u, s in seqs.items():
      f.write(" ".join([user2id[reviewer(u)]] +
                       [item2id[asin(e.item)] for e in s]) + "\n")
  all_ids = sorted(item2id.values(), key=int)
  with open(os.path.join(folder, "negative_samples.txt"), "w") as f:
    for u, s in seqs.items():
      touched = {item2id[asin(e.item)] for e in s}
      negs = rng.sample([i for i in all_ids if i not in touched], num_negatives)
      f.write(" ".join([user2id[reviewer(u)]] + negs) + "\n")
  reviews, exps = {"train": [], "val": [], "test": []}, {"train": [], "val": [],
                                                          "test": []}
  for n, e in enumerate(world.events):
    split = ("train", "train", "train", "train", "train", "train", "train",
             "train", "val", "test")[n % 10]
    rec = {"reviewerID": reviewer(e.user), "asin": asin(e.item),
           "reviewerName": world.user_names[e.user], "helpful": [0, 0],
           "reviewText": e.review, "overall": float(e.rating),
           "summary": e.summary, "unixReviewTime": e.timestamp,
           "reviewTime": "01 01, 2014"}
    reviews[split].append(rec)
    exps[split].append(dict(rec, explanation=e.review.split(". ")[1],
                            feature=e.review.split()[3]))
  for name, obj in (("review_splits.pkl", reviews), ("exp_splits.pkl", exps),
                    ("user_id2name.pkl", {user2id[reviewer(u)]: world.user_names[u]
                                          for u in seqs})):
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump(obj, f, protocol=4)
  with gzip.open(os.path.join(folder, "meta.json.gz"), "wt") as f:
    for i in range(1, world.num_items + 1):
      f.write(repr({"asin": asin(i), "title": world.titles[i],
                    "brand": f"Brand{world.item_group[i]}"}) + "\n")
  return folder


def write_raw(dataset: str, folder, world: World) -> Tuple[str, dict]:
  """Writes `dataset`'s format; returns (raw_dir, extra prepare() kwargs)."""
  if dataset == "ml-100k":
    return write_movielens_grouplens(folder, world), {}
  if dataset == "amazon":
    return write_amazon(folder, world), {"category": "Beauty"}
  if dataset == "yelp":
    return write_yelp(folder, world), {}
  if dataset == "p5":
    return write_p5_release(folder, world), {"category": "beauty"}
  raise ValueError(dataset)


def prepared_root(tmp_dir, dataset: str = "ml-100k", *, build_tfds: bool = True,
                  indexing: str = "random", seed: int = 0, item_tokens: bool = False,
                  **world_kwargs) -> str:
  """Writes a fixture in `dataset`'s raw format and prepares it.

  Returns the data root (pass it to `schema.set_data_root`). Dataset keys:
  ml-100k -> "ml100k", amazon -> "amazon_beauty", yelp -> "yelp",
  p5 -> "amazon_beauty".
  """
  from p5jax.data import prepare  # pylint: disable=g-import-not-at-top
  tmp_dir = os.fspath(tmp_dir)
  raw_dir, kwargs = write_raw(dataset, os.path.join(tmp_dir, "raw-" + dataset),
                              make_world(**world_kwargs))
  root = os.path.join(tmp_dir, "data")
  prepare.prepare(dataset, root, raw_dir=raw_dir, build_tfds=build_tfds,
                  indexing=indexing, seed=seed, item_tokens=item_tokens, **kwargs)
  return root
