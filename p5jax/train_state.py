"""The training state: step, parameters and optimizer state as one pytree.

A flax struct so that it can be jitted, donated, sharded leaf by leaf by the
`Partitioner` and saved by orbax as-is. The optax transformation is static
(not a leaf): it is code, not state, and is rebuilt from gin on restore.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """(step, params, opt_state) plus the static optax transformation.

  Attributes:
    step: int32 scalar, number of optimizer updates applied so far.
    params: the model parameters (unboxed arrays, no partitioning metadata).
    opt_state: `tx.init(params)`.
    tx: the optax transformation (static field).
  """
  step: jax.Array
  params: Any
  opt_state: optax.OptState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)

  def apply_gradient(self, grads: Any) -> "TrainState":
    """One optimizer update with `grads` (same tree as `params`)."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

  def state_dict(self) -> dict:
    """The checkpointed content (T5X name)."""
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state}
