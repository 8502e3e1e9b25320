r"""Beam-20 item-constrained decoding speed: p5jax vs Hugging Face `generate`.

Builds a random tiny `transformers.T5ForConditionalGeneration` (no download),
converts it with `p5jax.convert`, makes a catalog of item ids, and decodes the
same random prompts with

* p5jax: jitted `EncoderDecoderModel.predict_batch_with_aux` with
  `decoding.beam_search` and the item trie in `decoder_params` (the constraint
  is applied inside the jitted `lax.while_loop`);
* transformers: `generate(num_beams=K, num_return_sequences=K,
  prefix_allowed_tokens_fn=...)` walking a Python dict trie per beam and step
  (what OpenP5 does).

Both use float32, no length normalisation (alpha=0 / length_penalty=0) so the
scores are the items' log-likelihoods, the same weights, prompts and catalog,
and the same number of CPU threads as the machine has. The timed calls
alternate between the two systems batch by batch (one compiled / warmed-up
call each beforehand is not timed), so background load hits both alike.
Prints one JSON line: recommendation lists per second for both and their
ratio, plus agreement figures.

Where p5jax saves work (results unchanged): the encoder keys/values of every
cross-attention are projected once per example into the decoding cache and
shared by its beams (HF keeps a copy per beam and reorders it every step);
the first step runs once per example since all beams start identical; the
trie constraint is a gather over CSR arrays inside the jitted loop instead of
a Python callback and a [beams, vocab] mask per step. What remains is mostly
the output projection and log-normaliser over the full vocabulary for every
live beam, which both systems must compute for true log-likelihood scores.

Agreement. Both searches are approximate, and they finish beams differently:
like T5X, p5jax moves every EOS-ending candidate among the step's top
2 * beams into its finished pool, while HF only keeps those ranked within the
top `beams`, so the two top-10 sets can legitimately differ.
`*_top10_recall_vs_exact` is therefore the reference: the share of the exact
top-10 (every catalog item scored with `score_batch`) that each search finds,
on the first `--exact_users` users. `top10_mean_overlap` /
`top10_sets_equal` compare the two systems' top-10 sets directly.

  python benchmarks/decode_speed.py                    # defaults below
  python benchmarks/decode_speed.py --num_items=10000 --batch_size=32

Item-id token scheme (no SentencePiece model needed): item i is written as the
decimal string of i + 1 and cut into 2-character pieces from the left, the way
T5's SentencePiece splits "7391" into "▁73" "91". First pieces ("▁7", "▁73")
and continuation pieces ("9", "91") get separate ids, like "▁"-prefixed pieces:
ids 3..112 and 113..222 (0 pad, 1 EOS, 2 unk).
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402

from p5jax import convert  # noqa: E402
from p5jax import decoding  # noqa: E402
from p5jax import models  # noqa: E402
from p5jax import network  # noqa: E402

PAD_ID, EOS_ID = 0, 1
_PIECES = [str(d) for d in range(10)] + [f"{d:02d}" for d in range(100)]
_FIRST_PIECE_ID = {p: 3 + i for i, p in enumerate(_PIECES)}
_NEXT_PIECE_ID = {p: 3 + len(_PIECES) + i for i, p in enumerate(_PIECES)}


def item_tokens(index: int):
  """Item index -> token ids of its id string (see the module docstring)."""
  text = str(index + 1)
  pieces = [text[i:i + 2] for i in range(0, len(text), 2)]
  return [_FIRST_PIECE_ID[pieces[0]]] + [_NEXT_PIECE_ID[p] for p in pieces[1:]]


def make_hf_model(args):
  import torch
  import transformers
  torch.manual_seed(args.seed)
  config = transformers.T5Config(
      vocab_size=args.vocab_size, d_model=args.d_model, d_kv=args.d_model // args.num_heads,
      d_ff=args.d_ff, num_layers=args.num_layers, num_decoder_layers=args.num_layers,
      num_heads=args.num_heads, feed_forward_proj="relu", dropout_rate=0.0,
      tie_word_embeddings=True, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
      decoder_start_token_id=PAD_ID)
  return transformers.T5ForConditionalGeneration(config).eval()


def hf_prefix_fn(catalog):
  """`prefix_allowed_tokens_fn` over a Python dict trie (OpenP5's approach)."""
  root = {}
  for seq in catalog:
    node = root
    for tok in list(seq) + [EOS_ID]:
      node = node.setdefault(tok, {})

  def allowed(batch_id, input_ids):
    del batch_id
    node = root
    for tok in input_ids.tolist()[1:]:  # skip the decoder start token
      node = node.get(tok)
      if node is None:
        return [PAD_ID]
    return list(node) or [PAD_ID]

  return allowed


def hf_decode(hf_model, prefix_fn, inputs_BxS, args, max_len):
  import torch
  ids = torch.from_numpy(inputs_BxS.astype(np.int64))
  with torch.inference_mode():
    out = hf_model.generate(
        input_ids=ids, attention_mask=(ids != PAD_ID).long(), num_beams=args.num_beams,
        num_return_sequences=args.num_beams, max_new_tokens=max_len, do_sample=False,
        length_penalty=0.0, prefix_allowed_tokens_fn=prefix_fn,
        output_scores=True, return_dict_in_generate=True)
  seqs = out.sequences[:, 1:].numpy().reshape(len(inputs_BxS), args.num_beams, -1)
  return seqs, out.sequences_scores.numpy().reshape(len(inputs_BxS), args.num_beams)


def seq_to_item(lookup, seq):
  toks = []
  for t in seq:
    if t == EOS_ID:
      return lookup.get(tuple(toks), -1)
    toks.append(int(t))
  return -1


def exact_topk(model, params, batches, catalog, max_len, k, num_users):
  """Exact top-k items of the first `num_users` users: every item scored."""
  if num_users <= 0:
    return None
  targets = np.zeros((len(catalog), max_len), np.int32)
  for i, seq in enumerate(catalog):
    targets[i, :len(seq) + 1] = list(seq) + [EOS_ID]
  shifted = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
  score = jax.jit(model.score_batch)
  users = np.concatenate(batches)[:num_users]
  top = []
  for inputs in users:
    scores = score(params, {
        "encoder_input_tokens": jnp.asarray(np.repeat(inputs[None], len(catalog), 0)),
        "decoder_input_tokens": jnp.asarray(shifted),
        "decoder_target_tokens": jnp.asarray(targets),
        "decoder_loss_weights": jnp.asarray(targets > 0, jnp.float32)})
    top.append(np.argsort(-np.asarray(scores), kind="stable")[:k])
  return np.array(top)


def recall(items_UxK, exact_Uxk, k, best_last):
  """Mean fraction of the exact top-k found in a system's top-k."""
  found = [items[-k:] if best_last else items[:k] for items in items_UxK]
  return round(float(np.mean([len(set(f) & set(e)) / k
                              for f, e in zip(found, exact_Uxk)])), 4)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num_items", type=int, default=1000)
  p.add_argument("--num_beams", type=int, default=20)
  p.add_argument("--batch_size", type=int, default=16, help="users per decode call")
  p.add_argument("--num_batches", type=int, default=4, help="timed calls per system")
  p.add_argument("--inputs_length", type=int, default=64)
  p.add_argument("--vocab_size", type=int, default=32128)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--d_ff", type=int, default=512)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--num_layers", type=int, default=2)
  p.add_argument("--topk", type=int, default=10, help="k of the agreement check")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--exact_users", type=int, default=8,
                 help="users whose exact top-k (score_batch over the whole "
                 "catalog) both beam searches are compared with; 0 = skip")
  p.add_argument("--skip_hf", action="store_true", help="time p5jax only")
  args = p.parse_args(argv)

  import torch
  torch.set_num_threads(os.cpu_count())
  catalog = [item_tokens(i) for i in range(args.num_items)]
  lookup = {tuple(s): i for i, s in enumerate(catalog)}
  max_len = max(len(s) for s in catalog) + 1  # + EOS

  # Same random weights in both frameworks.
  hf_model = make_hf_model(args)
  with tempfile.TemporaryDirectory() as hf_dir:
    hf_model.save_pretrained(hf_dir)
    config, params = convert.convert_hf_checkpoint(hf_dir)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  vocab = seqio.PassThroughVocabulary(size=config.vocab_size, eos_id=EOS_ID)
  model = models.EncoderDecoderModel(network.Transformer(config), vocab, vocab,
                                     decode_fn=decoding.beam_search)
  trie = decoding.build_item_trie(catalog, config.vocab_size, EOS_ID)

  @jax.jit
  def recommend(params, batch, trie):
    decodes, aux = model.predict_batch_with_aux(
        params, batch, decoder_params={"constraint": trie, "alpha": 0.0},
        return_all_decodes=True, num_decodes=args.num_beams)
    return decoding.item_indices(trie, decodes), aux["scores"]

  rng = np.random.RandomState(args.seed)
  batches = []
  for _ in range(args.num_batches):
    lengths = rng.randint(args.inputs_length // 2, args.inputs_length, size=args.batch_size)
    inputs = rng.randint(3, config.vocab_size, size=(args.batch_size, args.inputs_length))
    inputs[np.arange(args.inputs_length)[None, :] >= lengths[:, None]] = PAD_ID
    inputs[np.arange(args.batch_size), lengths - 1] = EOS_ID
    batches.append(inputs.astype(np.int32))

  def jax_batch(inputs):
    return {"encoder_input_tokens": jnp.asarray(inputs),
            "decoder_input_tokens": jnp.zeros((len(inputs), max_len), jnp.int32)}

  start = time.perf_counter()
  jax.block_until_ready(recommend(params, jax_batch(batches[0]), trie))
  compile_s = time.perf_counter() - start
  if not args.skip_hf:
    prefix_fn = hf_prefix_fn(catalog)
    hf_decode(hf_model, prefix_fn, batches[0][:2], args, max_len)  # warm-up

  # The two systems alternate batch by batch, so load from other processes
  # on a shared machine hits both alike.
  ours, hf, ours_s, hf_s = [], [], 0.0, 0.0
  for inputs in batches:
    start = time.perf_counter()
    ours.append(jax.tree_util.tree_map(np.asarray, recommend(params, jax_batch(inputs), trie)))
    ours_s += time.perf_counter() - start
    if not args.skip_hf:
      start = time.perf_counter()
      hf.append(hf_decode(hf_model, prefix_fn, inputs, args, max_len))
      hf_s += time.perf_counter() - start
  users = args.num_batches * args.batch_size
  result = {
      "num_items": args.num_items, "num_beams": args.num_beams, "users": users,
      "batch_size": args.batch_size, "cpu_threads": os.cpu_count(),
      "backend": jax.default_backend(), "trie_bytes": trie.nbytes(),
      "ours_compile_s": round(compile_s, 2),
      "ours_recs_per_s": round(users / ours_s, 2),
  }
  ours_items = np.concatenate([items for items, _ in ours])
  result["ours_all_valid_distinct"] = bool(
      (ours_items >= 0).all() and all(len(set(r)) == args.num_beams for r in ours_items))

  k = args.topk
  exact = exact_topk(model, params, batches, catalog, max_len, k, args.exact_users)
  if exact is not None:
    result[f"ours_top{k}_recall_vs_exact"] = recall(ours_items[:len(exact)], exact, k, True)

  if not args.skip_hf:
    hf_items = np.array([[seq_to_item(lookup, s) for s in row]
                         for seqs, _ in hf for row in seqs])
    # Ours are sorted ascending (best last), HF's descending (best first).
    overlap = [len(set(a[-k:]) & set(b[:k])) / k for a, b in zip(ours_items, hf_items)]
    if exact is not None:
      result[f"hf_top{k}_recall_vs_exact"] = recall(hf_items[:len(exact)], exact, k, False)
    result.update({
        "hf_recs_per_s": round(users / hf_s, 2),
        "ratio": round(hf_s / ours_s, 2),
        f"top{k}_mean_overlap": round(float(np.mean(overlap)), 4),
        f"top{k}_sets_equal": round(float(np.mean([o == 1.0 for o in overlap])), 4),
        "hf_all_valid": bool((hf_items >= 0).all()),
    })
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
