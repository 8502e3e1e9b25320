"""Tests for p5jax.partitioning: rules, mesh shapes, data layout, partition()."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p5jax import partitioning

P = partitioning.PartitionSpec


def test_standard_rules_map_logical_names_to_mesh_axes():
  part = partitioning.Partitioner(num_partitions=2)
  to_mesh = part.logical_to_mesh_axes
  assert to_mesh(P("batch", "length", "embed")) == P("data", None, None)
  assert to_mesh(P("embed", "mlp")) == P(None, "model")
  assert to_mesh(P("vocab", "embed")) == P("model", None)
  assert to_mesh(P("embed", "heads", "kv")) == P(None, "model", None)
  assert to_mesh(P("heads", "relpos_buckets")) == P("model", None)
  part2 = partitioning.Partitioner(
      num_partitions=2, logical_axis_rules=partitioning.standard_logical_axis_rules(
          parameter_partitioning_dims=2))
  assert part2.logical_to_mesh_axes(P("embed", "mlp")) == P("data", "model")
  with pytest.raises(partitioning.PartitioningError, match="activation_partitioning_dims"):
    partitioning.standard_logical_axis_rules(activation_partitioning_dims=3)


@pytest.mark.parametrize("kwargs,shape", [
    (dict(num_partitions=1), (4, 1)), (dict(num_partitions=2), (2, 2)),
    (dict(num_partitions=4), (1, 4)), (dict(mesh_shape=(-1, 2)), (2, 2)),
    (dict(mesh_shape=(4, -1)), (4, 1))])
def test_mesh_shapes(kwargs, shape):
  mesh = partitioning.Partitioner(**kwargs).mesh
  assert (mesh.shape["data"], mesh.shape["model"]) == shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_partitions=3), "does not divide"), (dict(mesh_shape=(3, 1)), "needs 3 devices"),
    (dict(mesh_shape=(-1, -1)), "at most one -1"), (dict(mesh_shape=(4,)), "data, model")])
def test_bad_mesh_is_a_clear_error(kwargs, match):
  with pytest.raises(partitioning.PartitioningError, match=match):
    partitioning.Partitioner(**kwargs)


def test_data_layout_single_host():
  part = partitioning.Partitioner(num_partitions=2)
  layout = part.get_data_layout(16)
  assert (layout.shard_id, layout.num_shards, layout.per_host_batch_size) == (0, 1, 16)
  assert layout.is_first_host_in_replica_set
  with pytest.raises(partitioning.PartitioningError, match="not divisible by the data mesh"):
    part.get_data_layout(3)
  batch = part.host_local_to_global({"x": np.arange(8).reshape(4, 2)})
  assert batch["x"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(8).reshape(4, 2))


def test_partition_applies_shardings_and_logical_constraints():
  part = partitioning.Partitioner(num_partitions=2)

  def fn(x, w):
    h = nn.with_logical_constraint(x @ w, ("batch", "mlp"))
    return h, h.sum()

  jitted = part.partition(fn, in_axis_resources=(P("data", None), P(None, "model")),
                          out_axis_resources=(P("data", "model"), None))
  x, w = jnp.ones((4, 3)), jnp.ones((3, 8))
  h, total = jitted(x, w)
  assert h.sharding.spec == P("data", "model")
  assert total.sharding.is_fully_replicated and len(total.sharding.device_set) == 4
  assert float(total) == 4 * 8 * 3
  assert "sharding_constraint" in jitted.lower(x, w).as_text()


def test_opt_state_axes_follow_params_and_replicate_the_rest():
  part = partitioning.Partitioner(num_partitions=2)
  params = {"big": jax.ShapeDtypeStruct((256, 256), jnp.float32),
            "vec": jax.ShapeDtypeStruct((8,), jnp.float32)}
  axes = {"big": P(None, "model"), "vec": P("model")}
  adam = part.opt_state_mesh_axes(optax.adam(1e-3), params, axes)
  assert adam[0].mu == axes and adam[0].nu == axes and adam[0].count == P()
  # Adafactor keeps factored row/column statistics for "big": replicated.
  ada = part.opt_state_mesh_axes(optax.adafactor(1e-3), params, axes)
  specs = jax.tree_util.tree_leaves(ada, is_leaf=lambda x: isinstance(x, P))
  shapes = jax.tree_util.tree_leaves(jax.eval_shape(optax.adafactor(1e-3).init, params))
  by_shape = {tuple(s.shape): spec for spec, s in zip(specs, shapes)}
  assert by_shape[(256,)] == P()          # factored row / column statistics
  assert by_shape[(8,)] == P("model")     # unfactored second moment of "vec"
  assert all(spec == P() or len(spec) == len(s.shape) for spec, s in zip(specs, shapes))
