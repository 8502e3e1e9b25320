"""Tests for p5jax.trainer: sharded == single-device, microbatching, metrics.

Also home of the small test model and SeqIO task that the other trainer-stack
tests (`checkpoints_test`, `train_test`) import: a flax encoder-decoder toy with
logical axis names on every parameter, and a T5X-contract wrapper around it.
"""
import os
import tempfile

import clu.metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio
import tensorflow as tf

from p5jax import optimizers
from p5jax import partitioning
from p5jax import train as train_lib
from p5jax import trainer as trainer_lib

# Each train() call builds fresh objects (as a restarted job does), so the
# same programs are compiled by several tests: compile each once per machine.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "p5jax_test_compilation_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

VOCAB = 32
ENC_LEN, DEC_LEN = 8, 4


class ToyEncDec(nn.Module):
  """Embeds tokens, mean-pools the encoder, adds it to decoder embeddings, MLP -> logits."""
  vocab: int = VOCAB
  d_model: int = 8
  d_ff: int = 16
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, encoder_input_tokens, decoder_input_tokens, enable_dropout=False):
    embed = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")), (self.vocab, self.d_model))
    enc_BxLxD = embed[encoder_input_tokens]
    mask_BxL = (encoder_input_tokens > 0).astype(jnp.float32)
    pooled_BxD = (enc_BxLxD * mask_BxL[..., None]).sum(1) / jnp.maximum(mask_BxL.sum(1), 1)[:, None]
    x_BxTxD = embed[decoder_input_tokens] + pooled_BxD[:, None, :]
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    h = nn.Dense(self.d_ff, name="wi",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.lecun_normal(), ("embed", "mlp")))(x_BxTxD)
    h = nn.Dropout(self.dropout_rate)(nn.relu(h), deterministic=not enable_dropout)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                       (self.d_ff,))
    return nn.Dense(self.vocab, name="logits", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "vocab")))(h * scale)


class ToyModel:
  """T5X `BaseModel` contract around `ToyEncDec` (per-token mean cross-entropy)."""
  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter
  _loss_normalizing_factor = "NUM_REAL_TARGET_TOKENS"  # T5X name for a token mean

  def __init__(self, dropout_rate=0.1, optimizer_def=None, d_model=8):
    self.module = ToyEncDec(dropout_rate=dropout_rate, d_model=d_model)
    self.optimizer_def = optimizer_def

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    enc = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
    dec = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
    return self.module.init(rng, enc, dec)

  def loss_fn(self, params, batch, dropout_rng):
    logits = self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        enable_dropout=dropout_rng is not None,
        rngs={"dropout": dropout_rng} if dropout_rng is not None else None)
    targets = batch["decoder_target_tokens"]
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = jnp.sum(xent * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    accuracy = clu.metrics.Accuracy.from_model_output(
        logits=logits.reshape(-1, logits.shape[-1]), labels=targets.reshape(-1).astype(jnp.int32),
        mask=weights.reshape(-1) > 0)
    return loss, {"accuracy": accuracy}


def make_batches(n, batch_size=8, seed=0):
  """Deterministic host batches in EncDecFeatureConverter layout (target = input[0:4])."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    enc = rng.randint(2, VOCAB, size=(batch_size, ENC_LEN)).astype(np.int32)
    enc[:, -rng.randint(0, 3):] = 0  # some padding
    tgt = enc[:, :DEC_LEN].copy()
    tgt[:, -1] = 1  # EOS
    dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], axis=1)
    out.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
                "decoder_target_tokens": tgt,
                "decoder_loss_weights": (tgt > 0).astype(np.int32)})
  return out


# -- a tiny registered SeqIO task (integer tokens; no tokenizer needed) ---------------
TOY_TASK = "p5jax_toy_copy"


def _toy_source(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
  n = {"train": 64, "validation": 12}[split]
  rng = np.random.RandomState(0 if split == "train" else 1)
  lengths = rng.randint(3, ENC_LEN, size=n)
  inputs = np.zeros((n, ENC_LEN - 1), np.int32)
  for i, length in enumerate(lengths):
    inputs[i, :length] = rng.randint(2, VOCAB, size=length)
  ds = tf.data.Dataset.from_tensor_slices({"inputs": inputs})

  def to_example(ex):
    x = tf.boolean_mask(ex["inputs"], ex["inputs"] > 0)
    return {"inputs": x, "targets": x[:DEC_LEN - 1]}
  return ds.map(to_example)


def register_toy_task():
  if TOY_TASK in seqio.TaskRegistry.names():
    return TOY_TASK
  vocab = seqio.PassThroughVocabulary(size=VOCAB, eos_id=1)
  seqio.TaskRegistry.add(
      TOY_TASK,
      source=seqio.FunctionDataSource(_toy_source, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(vocab, add_eos=True, dtype=tf.int32),
                       "targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)})
  return TOY_TASK


# -- helpers ---------------------------------------------------------------------------
def build(model, partitioner, optimizer, batch, seed=0, config=trainer_lib.TrainerConfig()):
  shapes = {k: v.shape for k, v in batch.items()}
  init_fn, abstract, axes = train_lib.create_train_state(
      model, optimizer, partitioner, shapes, None, jax.random.key(seed))
  state = init_fn(jax.random.key(seed))
  trainer = trainer_lib.Trainer(model, optimizer, partitioner, axes, config,
                                summary_dir=None, rng_seed=seed)
  return state, trainer, abstract


def run_steps(partitioner, batches, optimizer=None, config=trainer_lib.TrainerConfig(),
              dropout_rate=0.1):
  model = ToyModel(dropout_rate=dropout_rate)
  optimizer = optimizer or optimizers.adamw(1e-2, weight_decay=0.01)
  state, trainer, _ = build(model, partitioner, optimizer, batches[0], config=config)
  state, losses = step_through(trainer, partitioner, state, batches)
  return np.array(losses), jax.device_get(state.params), state


def step_through(trainer, partitioner, state, batches):
  """One compiled train step per host batch; returns (state, losses), trainer closed."""
  losses = []
  for b in batches:
    state, metrics = trainer.compiled_train_step(b)(
        state, partitioner.host_local_to_global(b), trainer._rng)  # pylint: disable=protected-access
    losses.append(float(metrics["loss"]))
  trainer.close()
  return state, losses


# -- tests -------------------------------------------------------------------------------
def test_four_fake_devices():
  assert jax.device_count() == 4


def test_2x2_mesh_matches_single_device():
  batches = make_batches(5)
  one = partitioning.Partitioner(devices=jax.devices()[:1])
  mesh = partitioning.Partitioner(num_partitions=2)
  assert dict(mesh.mesh.shape) == {"data": 2, "model": 2}
  losses1, params1, _ = run_steps(one, batches)
  losses4, params4, state4 = run_steps(mesh, batches)
  np.testing.assert_allclose(losses4, losses1, atol=1e-5, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                         params4, params1)
  assert losses1[-1] < losses1[0]  # it does learn
  # Parameters really are split over `model` (vocab/mlp axes) and the
  # optimizer's step count is replicated on all 4 devices, not on one.
  kernel = state4.params["logits"]["kernel"]
  assert kernel.sharding.spec == partitioning.PartitionSpec(None, "model")
  count = state4.opt_state[1][0].count
  assert len(count.sharding.device_set) == 4 and count.sharding.is_fully_replicated


def test_microbatches_match_big_batch():
  batches = make_batches(3)
  part = partitioning.Partitioner(num_partitions=1)
  opt = optimizers.sgd(0.5)
  big, big_params, _ = run_steps(part, batches, opt, dropout_rate=0.0)
  micro, micro_params, _ = run_steps(
      part, batches, opt, dropout_rate=0.0,
      config=trainer_lib.TrainerConfig(num_microbatches=4))  # weighting inferred: "tokens"
  np.testing.assert_allclose(micro, big, rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         micro_params, big_params)


def test_train_loop_metrics_dropout_rng_and_stop():
  part = partitioning.Partitioner(num_partitions=2)
  batches = make_batches(4)
  model = ToyModel(dropout_rate=0.5)
  opt = optimizers.adamw(optimizers.linear_warmup_linear_decay(1e-2, total_steps=4))
  written = []

  class Writer:
    def write_scalars(self, step, scalars):
      written.append((step, dict(scalars)))

    def flush(self):
      pass

    def close(self):
      pass

  shapes = {k: v.shape for k, v in batches[0].items()}
  init_fn, _, axes = train_lib.create_train_state(model, opt, part, shapes)
  trainer = trainer_lib.Trainer(model, opt, part, axes,
                                trainer_lib.TrainerConfig(log_every_steps=2), writer=Writer())
  state = init_fn(jax.random.key(0))

  # Dropout masks depend on (seed, step) only: same step -> same loss.
  step_fn = trainer.compiled_train_step(batches[0])
  copy = lambda s: jax.tree_util.tree_map(jnp.copy, s)  # the step donates its input
  run = lambda s: float(step_fn(s, part.host_local_to_global(batches[0]), trainer._rng)[1]["loss"])  # pylint: disable=protected-access
  at0, at0_again = run(copy(state)), run(copy(state))
  at1 = run(copy(state).replace(step=jnp.ones((), jnp.int32)))
  assert at0 == at0_again and at0 != at1

  state, last, ran = trainer.train(state, iter(batches), 4)
  assert ran == 4 and int(state.step) == 4
  assert [s for s, _ in written] == [2, 4]
  names = set(written[-1][1])
  for name in ("loss", "accuracy", "learning_rate", "grad_norm", "timing/examples_per_second",
               "timing/tokens_per_second"):
    assert f"train/{name}" in names
  # Warmup over 1 step: lr(0) = 0, lr(1) = 1e-2 -> first window mean 5e-3.
  assert written[0][1]["train/learning_rate"] == pytest.approx(0.005, rel=1e-5)
  assert 0.0 <= last["accuracy"] <= 1.0
  assert trainer_lib.count_tokens(batches[0]) == int(
      (batches[0]["encoder_input_tokens"] > 0).sum() + (batches[0]["decoder_target_tokens"] > 0).sum())

  evals = trainer.evaluate(state.params, iter(batches[:2]), step=4)
  assert set(evals) == {"loss", "accuracy"}
  assert written[-1][0] == 4 and "train_eval/loss" in written[-1][1]

  # SIGTERM path: the loop polls `stop_requested` between steps.
  calls = []
  state, _, ran = trainer.train(state, iter(batches), 4,
                                stop_requested=lambda: calls.append(1) or len(calls) > 2)
  assert ran == 2 and int(state.step) == 6
