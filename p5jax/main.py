r"""The main job: prepare -> pretrain -> evaluate every prompt -> recommend.

  python -m p5jax.main --gin_file=gin/experiments/ml100k_cpu.gin \
      --gin.MODEL_DIR="'runs/ml100k_cpu'"

Stages (importable: `setup` parses gin and prepares the data, then `run`, or
one stage at a time with `train` and `run_arguments`, as in
colab/p5jax_quickstart.ipynb):

1. prepare: `DATASET` is prepared under the data root (`DATA_DIR`, else
   ``$P5JAX_DATA_DIR``, else ``~/.cache/p5jax/data``) unless its manifest is
   already there with the same indexing and seed (ML-100K is fetched and
   checked by sha256; other datasets need `RAW_DIR`).
2. train: `p5jax.train.train` exactly as ``python -m p5jax.train`` runs it
   (resumes if MODEL_DIR already holds a checkpoint).
3. evaluate: every per-prompt task of `EVAL_MIXTURE` (default
   ``p5_<DATASET>_eval``: all families, seen and unseen prompts) ->
   ``MODEL_DIR/eval/results.{md,json,png}``, table printed.
4. recommend: top-k items for `RECOMMEND_USER` with titles.

Gin: include ``gin/runs/main.gin`` (it includes ``runs/pretrain.gin``); see
its header for the macros.
"""
import dataclasses
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import gin

from p5jax import checkpoints
from p5jax import eval as eval_lib
from p5jax import gin_utils
from p5jax import recommend
from p5jax import train as train_lib
from p5jax.data import schema


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """How the main job prepares its dataset if it is not prepared yet."""
  dataset: str = "ml100k"
  indexing: str = "random"
  seed: int = 0
  kcore: int = 5
  raw_dir: Optional[str] = None
  # Amazon raw files are named by category (reviews_Beauty_5.json.gz).
  category: Optional[str] = None
  # One vocabulary piece per item ("<i7391>") instead of its digits.
  item_tokens: bool = False


def ensure_prepared(cfg: DataConfig, data_root: Optional[str] = None) -> dict:
  """Prepares `cfg.dataset` under `data_root` unless an identical copy exists."""
  root = data_root or schema.data_root()
  manifest = schema.read_manifest(cfg.dataset, root)
  if manifest:
    same = (manifest.get("indexing"), manifest.get("seed"), manifest.get("kcore"),
            manifest.get("item_tokens", False)) == (
                cfg.indexing, cfg.seed, cfg.kcore, cfg.item_tokens)
    if same and os.path.isdir(os.path.join(schema.tfds_dir(root), f"p5_{cfg.dataset}")):
      print(f"[prepare] using {schema.dataset_dir(cfg.dataset, root)}", flush=True)
      return manifest["counts"]
  from p5jax.data import prepare  # pylint: disable=g-import-not-at-top
  tokens = ", item tokens" if cfg.item_tokens else ""
  print(f"[prepare] {cfg.dataset} ({cfg.indexing} indexing{tokens}, seed {cfg.seed})"
        f" -> {root}", flush=True)
  stats = prepare.prepare(cfg.dataset, root, raw_dir=cfg.raw_dir, indexing=cfg.indexing,
                          kcore=cfg.kcore, seed=cfg.seed, category=cfg.category,
                          item_tokens=cfg.item_tokens)
  print("[prepare] " + json.dumps(stats, sort_keys=True), flush=True)
  return stats


def setup(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
          gin_search_paths: Sequence[str] = ()) -> dict:
  """Stage 1 as the command line runs it, callable from a notebook.

  Parses gin exactly as ``--gin_file``/``--gin_bindings`` (clearing any earlier
  config, so a notebook cell can be re-run), sets the data root from
  ``DATA_DIR`` and prepares ``DATASET`` if needed.

  Returns:
    The prepared dataset's statistics.
  """
  gin.clear_config()
  gin_utils.parse_gin_flags(gin_search_paths, gin_files, gin_bindings, finalize_config=True)
  data_dir = gin_utils.macro_value("DATA_DIR")
  if data_dir:
    schema.set_data_root(data_dir)
  # Before gin builds the model: its vocabulary is part of the prepared data.
  return ensure_prepared(gin.get_configurable(DataConfig)())


def run_arguments() -> Dict[str, Any]:
  """`run`'s arguments as gin binds them, built (after `setup`).

  Keys: model, model_dir, dataset, eval_dataset_cfg, eval_config,
  partitioner, recommend_user, topk -- what a notebook needs to call the
  stages (`train`, `p5jax.eval.evaluate`, `p5jax.recommend`) one at a time.
  """
  return gin.get_bindings(run)


def train() -> None:
  """Stage 2: `p5jax.train.train` as gin configures it (resumes from MODEL_DIR)."""
  gin.get_configurable(train_lib.train)(summarize_config_fn=gin_utils.summarize_gin_config)


@gin.configurable
def run(*,
        model,
        model_dir: str,
        dataset: str,
        eval_dataset_cfg,
        eval_config=None,
        partitioner=None,
        recommend_user: Optional[str] = "1",
        topk: int = 10) -> Any:
  """Stages 2-4 (the data must be prepared): train, evaluate, recommend.

  Returns:
    The evaluation result rows (one per prompt).
  """
  print(f"[train] -> {model_dir}", flush=True)
  train()

  print(f"[evaluate] {eval_dataset_cfg.mixture_or_task_name} ({eval_dataset_cfg.split})",
        flush=True)
  rows = eval_lib.evaluate(
      model=model, dataset_cfg=eval_dataset_cfg,
      restore_checkpoint_cfg=checkpoints.RestoreCheckpointConfig(path=model_dir),
      partitioner=partitioner, output_dir=os.path.join(model_dir, "eval"),
      eval_config=eval_config)

  if recommend_user:
    print(f"[recommend] user_{recommend_user}", flush=True)
    rec = recommend.Recommender.from_model(model, model_dir, dataset, partitioner=partitioner)
    user_id = rec.resolve_user(recommend_user)
    if user_id is None:
      print(f"[recommend] unknown user {recommend_user!r}; see python -m p5jax.recommend "
            "--list_users", file=sys.stderr)
    else:
      print(recommend.report(rec, user_id, topk), flush=True)
  return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
  fv = gin_utils.define_gin_flags()

  def body():
    train_lib._quiet_library_info_logs()  # pylint: disable=protected-access
    setup(fv.gin_file, fv.gin_bindings, fv.gin_search_paths)
    run()

  gin_utils.run_cli(body, train_lib.is_user_error, argv)


if __name__ == "__main__":
  # Configure the importable module's functions, not this `__main__` copy.
  from p5jax import main as _main_module  # pylint: disable=g-import-not-at-top,import-self
  _main_module.main()
