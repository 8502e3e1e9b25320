"""Print rendered prompts of a P5 task or mixture, with targets and token counts.

  python -m tasks.inspect --mixture=p5_ml100k_pretrain --n=5 [--data_dir=DIR]
      [--split=train] [--seed=0]

Reads the prepared data under --data_dir (default: $P5JAX_DATA_DIR, else
~/.cache/p5jax/data) and shows each example's prompt, target, token counts
and whole-word count, the way the model will see them (after tokenization,
before padding).
"""
import sys
from typing import Iterator, Mapping, Optional

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when run as a program, so importing this module (tests,
  # notebooks) never collides with other modules' absl flags.
  flags.DEFINE_string("mixture", "p5_ml100k_pretrain", "Task or mixture name.")
  flags.DEFINE_integer("n", 5, "Number of examples to print.")
  flags.DEFINE_string("data_dir", None, "Data root (see p5jax.data.schema).")
  flags.DEFINE_string("split", "train", "Split to read.")
  flags.DEFINE_integer("seed", 0, "Seed for shuffling and prompt sampling.")
  flags.DEFINE_integer("inputs_length", 512, "Trim inputs to this many tokens.")
  flags.DEFINE_integer("targets_length", 64, "Trim targets to this many tokens.")


def examples(name: str, n: int, split: str = "train", seed: int = 0,
             sequence_length: Optional[Mapping[str, int]] = None) -> Iterator[dict]:
  """Yields `n` tokenized examples of task/mixture `name` as numpy dicts."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks.mixtures  # pylint: disable=g-import-not-at-top,unused-import
  import tasks.tasks  # pylint: disable=g-import-not-at-top,unused-import
  provider = seqio.get_mixture_or_task(name)
  kwargs = dict(sequence_length=sequence_length, split=split, shuffle=True,
                seed=seed, num_epochs=1)
  if isinstance(provider, seqio.Mixture):
    kwargs["copy_pretokenized"] = True
  ds = provider.get_dataset(**kwargs)
  yield from ds.take(n).as_numpy_iterator()


def format_example(ex: Mapping, index: int) -> str:
  text = lambda k: ex[k].decode("utf-8") if k in ex else "?"
  n_words = int(ex["inputs_whole_word_ids"].max()) if "inputs_whole_word_ids" in ex else 0
  return (f"[{index}] inputs ({len(ex['inputs'])} tokens, {n_words} words): "
          f"{text('inputs_pretokenized')}\n"
          f"    targets ({len(ex['targets'])} tokens): {text('targets_pretokenized')}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS/SeqIO info logs drown the prompts
  if FLAGS.data_dir:
    from p5jax.data import schema  # pylint: disable=g-import-not-at-top
    schema.set_data_root(FLAGS.data_dir)
  lengths = {"inputs": FLAGS.inputs_length, "targets": FLAGS.targets_length}
  for i, ex in enumerate(examples(FLAGS.mixture, FLAGS.n, FLAGS.split,
                                  FLAGS.seed, lengths)):
    print(format_example(ex, i))
  sys.stdout.flush()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
