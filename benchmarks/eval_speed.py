r"""Users/s of full-catalog sequential evaluation (beam 20, item-trie constraint).

  python benchmarks/eval_speed.py [--items=1682] [--batch=16] [--batches=4]

An ML-100K-sized catalog (1,682 item ids), a SentencePiece vocabulary trained
here on synthetic P5 prompts (digits split, as p5jax.vocab does), a random
tiny T5 (the CPU test size unless --d_model/--layers are raised) and
`evaluation.ModelRunner.rank_items` -- the exact path `p5jax.eval` uses for
2-x next-item prompts. Prints one JSON line; the reference figure is the ~1
user/s that OpenP5-style decoding (Hugging Face `generate` with a Python
`prefix_allowed_tokens_fn` callback per step) reaches on CPU.
"""
import argparse
import json
import os
import random
import tempfile
import time

import numpy as np


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--items", type=int, default=1682)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--batches", type=int, default=4)
  p.add_argument("--beam", type=int, default=20)
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--prompt_len", type=int, default=128)
  args = p.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from p5jax import evaluation, models, network, partitioning  # pylint: disable=g-import-not-at-top
  from p5jax import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

  rng = random.Random(0)
  items = [str(i) for i in range(1, args.items + 1)]
  texts = [f"user_{rng.randint(1, 943)} watched " + " , ".join(rng.sample(items, 20)) +
           " . Which movie comes next?" for _ in range(2000)]
  tmp = tempfile.mkdtemp()
  spm = vocab_lib.train_vocabulary(texts, os.path.join(tmp, "spiece.model"), vocab_size=512)
  vocab = seqio.SentencePieceVocabulary(spm, extra_ids=vocab_lib.EXTRA_IDS)
  cfg = network.T5Config(vocab_size=vocab_lib.model_vocab_size(vocab), d_model=args.d_model,
                         num_heads=4, head_dim=args.d_model // 4, d_ff=4 * args.d_model,
                         num_encoder_layers=args.layers, num_decoder_layers=args.layers,
                         dropout_rate=0.0)
  model = models.EncoderDecoderModel(network.Transformer(cfg), vocab, vocab)
  partitioner = partitioning.Partitioner()
  params, axes = evaluation.random_params(model, partitioner)
  runner = evaluation.ModelRunner(model, params, axes, partitioner)
  catalog = evaluation.Catalog("bench", items, {}, {}, {})
  t0 = time.time()
  index = evaluation.ItemIndex.build(catalog, vocab, runner.vocab_size)
  trie_s = time.time() - t0

  def batch():
    rows = [vocab.encode(rng.choice(texts))[:args.prompt_len - 1] + [1]
            for _ in range(args.batch)]
    tokens = np.zeros((args.batch, args.prompt_len), np.int32)
    for r, row in enumerate(rows):
      tokens[r, :len(row)] = row
    return {"encoder_input_tokens": tokens}

  t0 = time.time()
  ranked, _ = runner.rank_items(batch(), index.trie, args.beam)
  compile_s = time.time() - t0
  batches = [batch() for _ in range(args.batches)]
  t0 = time.time()
  for b in batches:
    ranked, _ = runner.rank_items(b, index.trie, args.beam)
  run_s = time.time() - t0
  valid = bool((ranked >= 0).all() and all(len(set(r)) == args.beam for r in ranked.tolist()))
  users_per_s = args.batch * args.batches / run_s
  print(json.dumps({
      "benchmark": "eval_speed", "items": args.items, "trie_nodes": index.trie.num_nodes,
      "beam": args.beam, "batch": args.batch, "d_model": args.d_model, "layers": args.layers,
      "prompt_len": args.prompt_len, "devices": jax.device_count(),
      "platform": jax.devices()[0].platform, "trie_build_s": round(trie_s, 3),
      "compile_s": round(compile_s, 2), "users_per_s": round(users_per_s, 1),
      "all_beams_valid_distinct": valid,
      "reference_openp5_style_users_per_s": 1.0,
      "speedup_vs_reference": round(users_per_s / 1.0, 1)}))


if __name__ == "__main__":
  main()
