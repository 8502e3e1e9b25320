"""Gin-configurable optax optimizers and learning-rate schedules.

Two recipes:

* `adamw` + `linear_warmup_linear_decay`: P5's recipe (AdamW, lr 1e-3, 5% linear
  warmup then linear decay to 0, gradient clipping at global norm 1.0,
  eps 1e-6, weight decay 0.01 on matrices only -- as the PyTorch original,
  which exempts biases and LayerNorm weights).
* `adafactor` + `rsqrt_decay`: T5's recipe (factored second moments,
  update clipping 1.0, decay rate 0.8, parameter-scale relative steps,
  lr = base / sqrt(max(step, warmup_steps))).

Both return an `Optimizer` (the optax transformation plus its schedule, which
the trainer logs as ``learning_rate``). Gradient accumulation over microbatches
happens in the train step (`trainer.TrainerConfig.num_microbatches`), not here.

Gin example::

  OPTIMIZER = @optimizers.adamw()
  optimizers.adamw.learning_rate = @optimizers.linear_warmup_linear_decay()
  optimizers.linear_warmup_linear_decay.total_steps = %TRAIN_STEPS
"""
import dataclasses
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and the learning-rate schedule it follows."""
  tx: optax.GradientTransformation
  learning_rate_fn: Schedule


def constant(value: float = 1e-3) -> Schedule:
  return optax.constant_schedule(value)


def linear_warmup_linear_decay(base_learning_rate: float = 1e-3,
                               total_steps: int = 10_000,
                               warmup_fraction: float = 0.05,
                               end_learning_rate: float = 0.0) -> Schedule:
  """0 -> base over ``warmup_fraction * total_steps``, then linearly to end."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  warmup_steps = max(1, int(round(warmup_fraction * total_steps)))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base_learning_rate, warmup_steps),
       optax.linear_schedule(base_learning_rate, end_learning_rate,
                             max(1, total_steps - warmup_steps))],
      boundaries=[warmup_steps])


def rsqrt_decay(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
  """T5's inverse-square-root schedule: base / sqrt(max(step, warmup_steps))."""
  def schedule(step):
    return base_learning_rate / jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32),
                                                     float(warmup_steps)))
  return schedule


def _as_schedule(learning_rate: Union[float, Schedule]) -> Schedule:
  return learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)


def _decay_mask(params):
  """Weight decay on matrices only (no layer-norm scales or other vectors)."""
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def adamw(learning_rate: Union[float, Schedule] = 1e-3,
          b1: float = 0.9,
          b2: float = 0.999,
          eps: float = 1e-6,
          weight_decay: float = 0.01,
          clip_norm: Optional[float] = 1.0) -> Optimizer:
  """P5's AdamW: global-norm clipping, then decoupled weight decay on matrices."""
  schedule = _as_schedule(learning_rate)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=_decay_mask))
  return Optimizer(tx=optax.chain(*parts), learning_rate_fn=schedule)


def adafactor(learning_rate: Union[float, Schedule] = 1e-2,
              decay_rate: float = 0.8,
              clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True,
              min_dim_size_to_factor: int = 128,
              momentum: Optional[float] = None,
              weight_decay_rate: Optional[float] = None) -> Optimizer:
  """T5's Adafactor (factored second moments, no momentum, update clipping)."""
  schedule = _as_schedule(learning_rate)
  tx = optax.adafactor(
      learning_rate=schedule, min_dim_size_to_factor=min_dim_size_to_factor,
      decay_rate=decay_rate, multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold, momentum=momentum,
      weight_decay_rate=weight_decay_rate)
  return Optimizer(tx=tx, learning_rate_fn=schedule)


def sgd(learning_rate: Union[float, Schedule] = 1e-2, momentum: Optional[float] = None) -> Optimizer:
  """Plain SGD (useful in tests: updates are easy to reason about)."""
  schedule = _as_schedule(learning_rate)
  return Optimizer(tx=optax.sgd(schedule, momentum=momentum), learning_rate_fn=schedule)


def as_optimizer(opt) -> Optimizer:
  """Accepts an `Optimizer` or a bare optax transformation (lr logged as 0)."""
  if isinstance(opt, Optimizer):
    return opt
  if isinstance(opt, optax.GradientTransformation):
    return Optimizer(tx=opt, learning_rate_fn=lambda step: jnp.zeros((), jnp.float32))
  raise TypeError(f"expected p5jax.optimizers.Optimizer or optax transformation, got {type(opt)}")
