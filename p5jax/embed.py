r"""Exports P5 encoder features of a task's examples to a Parquet file.

  python -m p5jax.embed --model_dir=/tmp/p5_ml100k_small \
      --task=p5_ml100k_rating_1_1 --split=train,validation,test \
      --out=/tmp/ml100k_rating_1_1.parquet

The model comes from the gin config the trainer saved (``<model_dir>/config.gin``:
the ``train.model`` binding, usually ``%MODEL``), or from ``--gin_file`` /
``--gin.X=V`` overrides as in T5X's eval; the parameters come from the latest
(or ``--step``) orbax checkpoint under ``--checkpoint`` (default: model_dir).
Heads fit on the train split and report on test, so export all three splits
(`p5jax.fit_head`). See `p5jax.features` for the columns.
"""
import os
import sys
from typing import Optional, Sequence

from p5jax import checkpoints
from p5jax import features as features_lib


class EmbedError(ValueError):
  """The model, checkpoint or task cannot be used for embedding."""


def load_model(model_dir: str, gin_files: Sequence[str] = (),
               gin_bindings: Sequence[str] = (), gin_search_paths: Sequence[str] = (),
               use_config_data_dir: bool = True):
  """Builds the model from ``<model_dir>/config.gin`` plus overrides.

  With `use_config_data_dir` the run's DATA_DIR becomes the data root before
  the model (whose vocabulary lives there) is built; otherwise set it first.

  Returns:
    (model, data_dir or None): the `EncoderDecoderModel` and the prepared-data
    root the run trained on (its ``DATA_DIR``), if it set one.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from p5jax import gin_utils  # pylint: disable=g-import-not-at-top
  config = os.path.join(model_dir, "config.gin")
  if not os.path.exists(config) and not gin_files and not gin_bindings:
    raise EmbedError(f"{config} does not exist and no --gin_file was given: "
                     "cannot tell which model to build")
  for path in gin_search_paths:
    gin.add_config_file_search_path(path)
  try:
    model, _, data_dir = gin_utils.model_from_run_config(
        config if os.path.exists(config) else None, use_config_data_dir=use_config_data_dir,
        gin_files=gin_files, gin_bindings=gin_bindings)
  except gin_utils.GinConfigError as e:
    raise EmbedError(str(e)) from None
  return model, data_dir


def load_params(checkpoint: str, model, partitioner, config: features_lib.EmbedConfig,
                step: Optional[int] = None):
  """Restores (params, params_axes) from an orbax checkpoint, sharded for `partitioner`."""
  abstract, axes = features_lib.abstract_params(
      model, partitioner, features_lib.model_input_shapes(config))
  params = checkpoints.restore_params(checkpoint, abstract,
                                      mode="latest" if step is None else "specific", step=step)
  return params, axes


def run(model, params, params_axes, partitioner, config: features_lib.EmbedConfig,
        out: str, source=None, progress: bool = True) -> features_lib.FeatureSchema:
  """Embeds `config.task` with a ready model; the library entry point."""
  from p5jax import utils
  embedder = features_lib.Embedder(model, params, params_axes, partitioner,
                                   config.batch_size, score_yes_no=config.score_yes_no)
  converter = utils.feature_converter_cls_for(model)(pack=False)
  return features_lib.export_features(embedder, config, converter, out, source, progress)


def main(argv):
  from absl import flags
  from p5jax import partitioning
  from p5jax import utils
  from p5jax.data import schema as data_schema
  f = flags.FLAGS
  if len(argv) > 1:
    raise EmbedError(f"unexpected arguments: {argv[1:]}")
  if not (f.model_dir and f.task and f.out):
    raise EmbedError("--model_dir, --task and --out are required")
  if f.data_dir:  # before the model: its vocabulary lives under the data root
    data_schema.set_data_root(f.data_dir)
  model, _ = load_model(f.model_dir, f.gin_file, f.gin_bindings, f.gin_search_paths,
                        use_config_data_dir=not f.data_dir)
  utils.import_module(f.module)
  utils.get_mixture_or_task(f.task)
  config = features_lib.EmbedConfig(
      task=f.task, splits=tuple(f.split), batch_size=f.batch_size,
      inputs_length=f.inputs_length, targets_length=f.targets_length,
      max_examples=f.max_examples, score_yes_no=f.score_yes_no)
  partitioner = partitioning.Partitioner(num_partitions=f.num_partitions)
  params, axes = load_params(f.checkpoint or f.model_dir, model, partitioner, config, f.step)
  schema = run(model, params, axes, partitioner, config, f.out,
               source={"model_dir": os.path.abspath(f.model_dir), "step": f.step})
  print(f"wrote {f.out}: columns {dict(schema.vector_columns)}", file=sys.stderr)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("model_dir", None, "Training run directory (config.gin, checkpoints).")
  flags.DEFINE_string("checkpoint", None, "Checkpoint path if not model_dir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("task", None, "SeqIO task to embed, e.g. p5_ml100k_rating_1_1.")
  flags.DEFINE_list("split", ["train", "validation", "test"], "Splits to export.")
  flags.DEFINE_string("out", None, "Output Parquet file.")
  flags.DEFINE_integer("batch_size", 64, "Global batch size (multiple of data shards).")
  flags.DEFINE_integer("inputs_length", 512, "Encoder length (task feature 'inputs').")
  flags.DEFINE_integer("targets_length", 64, "Decoder length (task feature 'targets').")
  flags.DEFINE_integer("max_examples", None, "Per-split cap (None = all).")
  flags.DEFINE_bool("score_yes_no", False, "Also store log p(yes) - log p(no).")
  flags.DEFINE_integer("num_partitions", 1, "Model-parallel mesh axis size.")
  flags.DEFINE_string("module", "tasks.tasks", "Module that registers the task.")
  flags.DEFINE_string("data_dir", None, "Prepared-data root (default: from config.gin).")
  flags.DEFINE_multi_string("gin_file", [], "Extra gin files (override config.gin).")
  flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings; --gin.X=V too.")
  flags.DEFINE_list("gin_search_paths", [], "Directories for gin includes.")


USER_ERRORS = (EmbedError, features_lib.FeatureFileError, checkpoints.CheckpointError)


def _cli():
  from absl import app
  from p5jax import gin_utils
  from p5jax import utils
  _define_flags()

  def _main(argv):
    try:
      main(argv)
    except USER_ERRORS + (utils.UnknownTaskError, utils.DatasetConfigError,
                          gin_utils.GinConfigError) as e:
      print(f"embed: {type(e).__name__}: {e}", file=sys.stderr)
      sys.exit(1)

  gin_utils.run(_main)


if __name__ == "__main__":
  _cli()
