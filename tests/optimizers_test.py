"""Tests for p5jax.optimizers: schedules, P5's AdamW, T5's Adafactor."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p5jax import optimizers
from p5jax import train_state


def test_linear_warmup_linear_decay():
  lr = optimizers.linear_warmup_linear_decay(1e-3, total_steps=100, warmup_fraction=0.05)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(1e-3)
  assert float(lr(2)) == pytest.approx(0.4e-3)
  assert float(lr(81)) == pytest.approx(0.2e-3, rel=1e-5)  # 76/95 of the decay
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="total_steps"):
    optimizers.linear_warmup_linear_decay(total_steps=0)


def test_rsqrt_decay():
  lr = optimizers.rsqrt_decay(1.0, warmup_steps=100)
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(100)) == pytest.approx(0.1)
  assert float(lr(400)) == pytest.approx(0.05)


def test_adamw_decays_matrices_only_and_clips():
  opt = optimizers.adamw(0.1, weight_decay=0.5, clip_norm=1.0)
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  state = train_state.TrainState.create(params, opt.tx)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  state = state.apply_gradient(zero)
  assert int(state.step) == 1
  np.testing.assert_allclose(state.params["kernel"], 1 - 0.1 * 0.5)  # decayed
  np.testing.assert_allclose(state.params["scale"], 1.0)  # no decay on vectors
  # Gradients are clipped to global norm 1 before Adam sees them.
  clip_state = opt.tx.init(params)
  big = jax.tree_util.tree_map(lambda p: 1e6 * jnp.ones_like(p), params)
  clipped, _ = optax.clip_by_global_norm(1.0).update(big, optax.EmptyState())
  assert float(optax.global_norm(clipped)) == pytest.approx(1.0)
  assert clip_state[0] == optax.EmptyState()


@pytest.mark.parametrize("make", [lambda: optimizers.adamw(0.1),
                                  lambda: optimizers.adafactor(0.1),
                                  lambda: optimizers.sgd(0.1)])
def test_optimizers_minimize_a_quadratic(make):
  opt = make()
  params = {"w": jnp.full((4, 3), 2.0), "b": jnp.full((3,), -1.0)}
  loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(p))
  state = train_state.TrainState.create(params, opt.tx)
  before = float(loss(state.params))
  for _ in range(20):
    state = state.apply_gradient(jax.grad(loss)(state.params))
  assert float(loss(state.params)) < 0.5 * before


def test_as_optimizer():
  tx = optax.sgd(0.1)
  assert optimizers.as_optimizer(tx).tx is tx
  with pytest.raises(TypeError, match="Optimizer or optax"):
    optimizers.as_optimizer("adam")
