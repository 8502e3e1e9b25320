r"""ML-100K next-item quality beside baselines, on one split in one run.

  python benchmarks/quality_ml100k.py --model_dir=runs/ml100k_cpu [--data_dir=...]

`--model_dir` is a trained run (e.g. the README main job). On the test split
(leave-one-out, all 943 users) it reports, side by side:

* p5jax: full-catalog constrained beam search (beam 20, the user's history
  excluded) with a seen sequential prompt (2-3) and the unseen one (2-13);
* popularity: items ranked by their count in everyone's non-test
  interactions, the user's history excluded (computed here, same split);
* item co-occurrence: unseen items that most often followed (<= 5 positions
  later) the user's last 5 items in everyone's non-test interactions -- a
  simple sequential baseline showing how much order there is to learn;
* OpenP5's published T5-small ML-100K figures (a quoted reference row: another
  split, another machine, not comparable to the last digit).

Prints one JSON line and a markdown table.
"""
import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time

# Published in the OpenP5 paper (T5-small, ML-100K, leave-one-out).
OPENP5_REFERENCE = {
    "OpenP5 T5-small, random indexing (published)": {"hr@10": 0.0922, "ndcg@10": 0.0470},
    "OpenP5 T5-small, sequential indexing (published)": {"hr@10": 0.1208, "ndcg@10": 0.0595},
}
KS = (5, 10)


def _ranking_metrics(sequences, top_for):
  """HR/NDCG@k on the leave-one-out test split; `top_for(items[:-1])` ranks."""
  sums = collections.defaultdict(float)
  for items in sequences.values():
    target = items[-1]
    top = top_for(items[:-1])[:max(KS)]
    for k in KS:
      if target in top[:k]:
        sums[f"hr@{k}"] += 1.0
        sums[f"ndcg@{k}"] += 1.0 / math.log2(top.index(target) + 2)
  n = len(sequences)
  return {f"{m}@{k}": sums[f"{m}@{k}"] / n for k in KS for m in ("hr", "ndcg")}


def popularity_metrics(sequences):
  """Most-popular-unseen: items by count in everyone's non-test interactions."""
  counts = collections.Counter()
  for items in sequences.values():
    counts.update(items[:-1])  # everything but the test items
  ranked = [item for item, _ in counts.most_common()]
  return _ranking_metrics(
      sequences, lambda history: [i for i in ranked if i not in set(history)])


def cooccurrence_metrics(sequences, window=5, recent=5):
  """Item-to-item neighbours: items following the user's last `recent` items.

  Counts ordered pairs at most `window` apart in everyone's non-test
  interactions; scores unseen items by their summed counts after the user's
  last `recent` items, popularity breaking ties. A classic non-neural
  sequential baseline, for scale.
  """
  follows = collections.defaultdict(collections.Counter)
  counts = collections.Counter()
  for items in sequences.values():
    history = items[:-1]
    counts.update(history)
    for a, item in enumerate(history):
      follows[item].update(history[a + 1:a + 1 + window])

  def top_for(history):
    seen = set(history)
    score = collections.Counter()
    for item in history[-recent:]:
      score.update(follows[item])
    ranked = sorted(counts, key=lambda i: (-score[i], -counts[i], i))
    return [i for i in ranked if i not in seen]

  return _ranking_metrics(sequences, top_for)


def p5jax_metrics(model_dir, dataset, prompts, beam_size, batch_size):
  from p5jax import checkpoints, evaluation, gin_utils, utils  # pylint: disable=g-import-not-at-top
  from p5jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  model, task_module, _ = gin_utils.model_from_run_config(
      os.path.join(model_dir, eval_lib.CONFIG_GIN))
  rows = {}
  with tempfile.TemporaryDirectory() as out:
    for prompt in prompts:
      task = f"p5_{dataset}_sequential_{prompt.replace('-', '_')}"
      t0 = time.perf_counter()
      result = eval_lib.evaluate(
          model=model,
          dataset_cfg=utils.DatasetConfig(mixture_or_task_name=task, task_feature_lengths=None,
                                          split="test", batch_size=batch_size, shuffle=False,
                                          seed=42, use_cached=False, pack=False,
                                          module=task_module),
          restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(path=model_dir),
          output_dir=out, print_table=False,
          eval_config=evaluation.EvalConfig(beam_size=beam_size, exclude_history=True,
                                            batch_size=batch_size))
      row = dict(result[0])
      row["seconds"] = time.perf_counter() - t0
      rows[prompt] = row
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model_dir", required=True, help="trained p5jax run directory")
  parser.add_argument("--data_dir", default=None, help="prepared-data root")
  parser.add_argument("--dataset", default="ml100k")
  parser.add_argument("--prompts", default="2-3,2-13", help="sequential prompt ids")
  parser.add_argument("--beam_size", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args(argv)

  from p5jax import evaluation  # pylint: disable=g-import-not-at-top
  from p5jax.data import schema  # pylint: disable=g-import-not-at-top
  if args.data_dir:
    schema.set_data_root(args.data_dir)
  catalog = evaluation.Catalog.load(args.dataset)
  popularity = popularity_metrics(catalog.sequences)
  ours = p5jax_metrics(os.path.abspath(args.model_dir), args.dataset,
                       args.prompts.split(","), args.beam_size, args.batch_size)

  table = {}
  for prompt, row in ours.items():
    unseen = " (unseen)" if not row.get("seen", True) else ""
    table[f"p5jax prompt {prompt}{unseen}"] = {k: row.get(k) for k in
                                               ("hr@5", "ndcg@5", "hr@10", "ndcg@10")}
  table["popularity, history excluded (same split)"] = popularity
  table["item co-occurrence after the last 5 items (same split)"] = cooccurrence_metrics(
      catalog.sequences)
  table.update(OPENP5_REFERENCE)
  best = max(r["hr@10"] for name, r in table.items() if name.startswith("p5jax"))
  best_ndcg = max(r["ndcg@10"] for name, r in table.items() if name.startswith("p5jax"))
  summary = {
      "benchmark": "quality_ml100k", "model_dir": args.model_dir,
      "users": len(catalog.sequences), "rows": table,
      "beats_popularity_hr@10": best > popularity["hr@10"],
      "beats_popularity_ndcg@10": best_ndcg > popularity["ndcg@10"],
      "hr@10_ratio_vs_popularity": best / popularity["hr@10"],
  }
  print(json.dumps(summary, sort_keys=True))
  print("| method | HR@5 | NDCG@5 | HR@10 | NDCG@10 |\n|---|---|---|---|---|")
  fmt = lambda v: "-" if v is None else f"{v:.4f}"
  for name, r in table.items():
    print(f"| {name} | {fmt(r.get('hr@5'))} | {fmt(r.get('ndcg@5'))} | "
          f"{fmt(r.get('hr@10'))} | {fmt(r.get('ndcg@10'))} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
