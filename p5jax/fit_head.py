r"""Fits a prediction head on an exported feature file, or compares methods.

Fit one head (prints one JSON line of test metrics, saves the head with --out):

  python -m p5jax.fit_head --features=/tmp/ml100k_rating.parquet \
      --head=gbdt --target=rating --out=/tmp/heads/gbdt

The same head on the ID baseline (target-encoded user/item statistics):

  python -m p5jax.fit_head --features=... --head=linear --inputs=ids

Side by side (markdown table): every head on P5 features and on the ID
baseline, plus generation results (an eval metrics JSON/JSONL or a
predictions JSONL) and, for clicks, `score_batch` yes/no scores stored in the
feature file:

  python -m p5jax.fit_head --compare --features=... --target=rating \
      --heads=linear,gbdt,mlp --generation=/tmp/eval/p5_ml100k_rating_1_1-metrics.jsonl
"""
import json
import sys

from absl import app
from absl import flags

from p5jax import heads as heads_lib

_FEATURES = flags.DEFINE_string("features", None, "Parquet feature file (p5jax.embed).")
_HEAD = flags.DEFINE_enum("head", "linear", heads_lib.HEADS, "Head to fit.")
_TARGET = flags.DEFINE_enum("target", "rating", heads_lib.TARGETS, "What to predict.")
_INPUTS = flags.DEFINE_list(
    "inputs", [], "Feature groups: vector columns of the file and/or 'ids' "
    "(default: every vector column).")
_OUT = flags.DEFINE_string("out", None, "Directory to save the fitted head in.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice.")
_COMPARE = flags.DEFINE_bool("compare", False, "Print the side-by-side table.")
_HEADS = flags.DEFINE_list("heads", ["mean", "linear", "logistic", "gbdt", "mlp"],
                           "Heads for --compare (those not fitting --target are skipped).")
_GENERATION = flags.DEFINE_multi_string(
    "generation", [], "Generation results for --compare: metrics JSON/JSONL or "
    "predictions JSONL (repeatable).")
_MLP_HIDDEN = flags.DEFINE_list("mlp_hidden", ["128", "64"], "MLP hidden widths.")
_MLP_EPOCHS = flags.DEFINE_integer("mlp_max_epochs", 200, "MLP epoch limit.")
_MLP_PATIENCE = flags.DEFINE_integer("mlp_patience", 10, "MLP early-stopping patience.")


def main(argv):
  del argv
  if not _FEATURES.value:
    raise app.UsageError("--features is required")
  mlp = heads_lib.MLPConfig(hidden=tuple(int(h) for h in _MLP_HIDDEN.value),
                            max_epochs=_MLP_EPOCHS.value, patience=_MLP_PATIENCE.value)
  try:
    if _COMPARE.value:
      rows = heads_lib.compare(_FEATURES.value, _TARGET.value, _HEADS.value,
                               _GENERATION.value, seed=_SEED.value, mlp=mlp)
      print(heads_lib.compare_table(rows))
      return
    config = heads_lib.HeadConfig(head=_HEAD.value, target=_TARGET.value,
                                  inputs=tuple(_INPUTS.value), seed=_SEED.value, mlp=mlp)
    head = heads_lib.fit_head(_FEATURES.value, config)
    if _OUT.value:
      head.save(_OUT.value)
    print(json.dumps(head.metrics, sort_keys=True))
  except heads_lib.HeadError as e:
    print(f"fit_head: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
