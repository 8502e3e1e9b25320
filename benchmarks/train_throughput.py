r"""Train-step throughput: p5jax (compiled, partitioned) vs PyTorch `transformers`.

Same T5 architecture (t5-small dims by default: d_model 512, 8 heads x 64,
d_ff 2048, 6+6 layers, relu, tied embeddings, dropout 0.1), same batch of
random tokens (no padding), same optimizer recipe (AdamW + global-norm clip
1.0), per-token mean cross-entropy on both sides, in one process on this
machine's CPU. Tokens/s counts encoder input + decoder target tokens.

  python benchmarks/train_throughput.py               # t5-small, batch 16, 128/32
  python benchmarks/train_throughput.py --preset=tiny # seconds, for a smoke check

Prints one JSON line: both tokens/s figures, the ratio (jax / torch) and the
configuration. Not a test: timings depend on the machine and its load.
"""
import argparse
import json
import os
import time

PRESETS = {
    "small": dict(vocab_size=32128, d_model=512, num_heads=8, head_dim=64, d_ff=2048,
                  num_layers=6),
    "tiny": dict(vocab_size=1024, d_model=64, num_heads=4, head_dim=16, d_ff=128,
                 num_layers=2),
}


def make_batch(batch_size, inputs_length, targets_length, vocab_size, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, vocab_size, size=(batch_size, inputs_length)).astype(np.int32)
  tgt = rng.randint(2, vocab_size, size=(batch_size, targets_length)).astype(np.int32)
  enc[:, -1] = tgt[:, -1] = 1  # EOS
  dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}


def bench_jax(dims, batch, steps, warmup, dropout_rng_impl=None):
  """Tokens/s of `trainer.Trainer`'s compiled train step."""
  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from p5jax import models, network, optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
  from p5jax import train as train_lib  # pylint: disable=g-import-not-at-top

  config = network.T5Config(
      vocab_size=dims["vocab_size"], d_model=dims["d_model"], num_heads=dims["num_heads"],
      head_dim=dims["head_dim"], d_ff=dims["d_ff"], num_encoder_layers=dims["num_layers"],
      num_decoder_layers=dims["num_layers"], dropout_rate=0.1, feed_forward_proj="relu",
      tie_word_embeddings=True)
  vocab = seqio.PassThroughVocabulary(size=dims["vocab_size"], eos_id=1)
  model = models.EncoderDecoderModel(network.Transformer(config), vocab, vocab,
                                     loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
  opt = optimizers.adamw(1e-4, weight_decay=0.01, clip_norm=1.0)
  part = partitioning.Partitioner()
  shapes = {k: v.shape for k, v in batch.items()}
  init_fn, _, axes = train_lib.create_train_state(model, opt, part, shapes)
  state = init_fn(jax.random.key(0))
  tr = trainer.Trainer(model, opt, part, axes,
                       trainer.TrainerConfig(dropout_rng_impl=dropout_rng_impl), summary_dir=None)
  step = tr.compiled_train_step(batch)
  t0 = time.perf_counter()
  for _ in range(warmup):  # the first call compiles
    state, m = step(state, part.host_local_to_global(batch), tr._rng)  # pylint: disable=protected-access
  jax.block_until_ready(m)
  compile_and_warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, part.host_local_to_global(batch), tr._rng)  # pylint: disable=protected-access
  jax.block_until_ready(m)
  seconds = time.perf_counter() - t0
  tr.close()
  tokens = trainer.count_tokens(batch) * steps
  return {"tokens_per_s": tokens / seconds, "step_s": seconds / steps,
          "warmup_s": compile_and_warmup_s, "final_loss": float(m["loss"]),
          "devices": jax.device_count()}


def bench_torch(dims, batch, steps, warmup):
  """Tokens/s of the same step in PyTorch `T5ForConditionalGeneration` + AdamW."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  config = transformers.T5Config(
      vocab_size=dims["vocab_size"], d_model=dims["d_model"], d_kv=dims["head_dim"],
      d_ff=dims["d_ff"], num_layers=dims["num_layers"], num_decoder_layers=dims["num_layers"],
      num_heads=dims["num_heads"], dropout_rate=0.1, feed_forward_proj="relu",
      tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(config)
  model.train()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                           {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, eps=1e-6)
  input_ids = torch.from_numpy(batch["encoder_input_tokens"]).long()
  labels = torch.from_numpy(batch["decoder_target_tokens"]).long()
  attention_mask = (input_ids > 0).long()

  def one_step():
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  t0 = time.perf_counter()
  for _ in range(warmup):
    one_step()
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = one_step()
  seconds = time.perf_counter() - t0
  tokens = int((batch["encoder_input_tokens"] != 0).sum() +
               (batch["decoder_target_tokens"] != 0).sum()) * steps
  return {"tokens_per_s": tokens / seconds, "step_s": seconds / steps, "warmup_s": warmup_s,
          "final_loss": loss, "threads": torch.get_num_threads()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--inputs_length", type=int, default=128)
  parser.add_argument("--targets_length", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per framework")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (incl. compile)")
  parser.add_argument("--dropout_rng_impl", default=None,
                      help="JAX dropout PRNG: None (threefry) or 'rbg' (TrainerConfig)")
  args = parser.parse_args()
  dims = PRESETS[args.preset]
  batch = make_batch(args.batch_size, args.inputs_length, args.targets_length,
                     dims["vocab_size"])
  jax_result = bench_jax(dims, batch, args.steps, args.warmup, args.dropout_rng_impl)
  torch_result = bench_torch(dims, batch, args.steps, args.warmup)
  print(json.dumps({
      "benchmark": "train_throughput",
      "preset": args.preset, **dims,
      "batch_size": args.batch_size, "inputs_length": args.inputs_length,
      "targets_length": args.targets_length, "steps": args.steps,
      "dropout_rng_impl": args.dropout_rng_impl or "threefry2x32",
      "jax_tokens_per_s": round(jax_result["tokens_per_s"], 1),
      "torch_tokens_per_s": round(torch_result["tokens_per_s"], 1),
      "ratio": round(jax_result["tokens_per_s"] / torch_result["tokens_per_s"], 3),
      "jax": jax_result, "torch": torch_result,
      "cpu_count": os.cpu_count(),
      "load_avg_1m": os.getloadavg()[0],
  }))


if __name__ == "__main__":
  main()
