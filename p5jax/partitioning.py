"""Every sharding decision of p5jax, in one place (T5X `partitioning.py` style).

A `Partitioner` owns a 2-D device mesh with axes (``data``, ``model``) and the
*logical axis rules* that map the logical names used by the network
(``batch, length, vocab, embed, mlp, heads, kv, joined_kv, relpos_buckets,
layers``) onto those mesh axes. Everything else in the library speaks only
logical names or asks the partitioner:

* `Partitioner.partition(fn, in_axis_resources, out_axis_resources)` is
  `jax.jit` with `NamedSharding`s built from `PartitionSpec`s on this mesh
  (T5X's `PjitPartitioner.partition`), traced with the logical rules active so
  `nn.with_logical_constraint` inside the model resolves against this mesh.
* `get_mesh_axes(...)` turns flax boxed (``nn.Partitioned``) variables into mesh
  `PartitionSpec`s for parameters and the optimizer state (params-shaped
  optimizer moments follow their parameter; scalars such as Adam's ``count``
  and Adafactor's factored statistics are replicated explicitly -- a plain
  ``jax.jit(tx.init)`` would leave them on a single device).
* `get_data_layout(batch_size)` says which slice of the global batch this host
  reads (T5X's `DataLayout`), and `host_local_to_global` assembles the global
  batch array from the per-host numpy batch.

Example: 4 devices, ``num_partitions=2`` -> mesh ``{data: 2, model: 2}``;
``batch`` is split over ``data``, ``mlp``/``heads``/``vocab``/``joined_kv``
over ``model``, ``embed``/``kv``/``length`` are replicated.
"""
import contextlib
import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
from flax.core import meta as flax_meta
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import optax

PartitionSpec = PartitionSpec  # re-exported: `partitioning.PartitionSpec`
LogicalAxisRules = Sequence[Tuple[str, Optional[str]]]

DATA_AXIS = "data"
MODEL_AXIS = "model"


class PartitioningError(ValueError):
  """A mesh or sharding request that cannot be satisfied on these devices."""


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: Optional[LogicalAxisRules] = None,
) -> Tuple[Tuple[str, Optional[str]], ...]:
  """T5X's standard rules from logical axis names to (``data``, ``model``).

  Args:
    activation_partitioning_dims: 1 = activations split over ``batch`` only;
      2 additionally splits ``embed`` activations over ``model`` (T5X's
      2-D activation partitioning).
    parameter_partitioning_dims: 1 = parameters split over ``model`` only; 2
      additionally splits ``embed`` params over ``data`` (ZeRO-3 like).
    additional_rules: rules placed *before* the standard ones (the first rule
      for a name that fits wins, as in flax).

  Returns:
    A tuple of ``(logical_name, mesh_axis_or_None)`` pairs.
  """
  if activation_partitioning_dims not in (1, 2):
    raise PartitioningError(
        f"activation_partitioning_dims must be 1 or 2, got {activation_partitioning_dims}")
  if parameter_partitioning_dims not in (1, 2):
    raise PartitioningError(
        f"parameter_partitioning_dims must be 1 or 2, got {parameter_partitioning_dims}")
  rules = [
      ("batch", DATA_AXIS),
      ("vocab", MODEL_AXIS),
      ("mlp", MODEL_AXIS),
      ("heads", MODEL_AXIS),
      ("joined_kv", MODEL_AXIS),
      ("kv", None),
      ("length", None),
      ("relpos_buckets", None),
      ("abspos_buckets", None),
      ("layers", None),
      ("stack", None),
      ("mlp_activations", None),
  ]
  if activation_partitioning_dims == 2:
    rules.append(("embed", MODEL_AXIS))
  if parameter_partitioning_dims == 2:
    rules.append(("embed", DATA_AXIS))
  rules.append(("embed", None))
  return tuple(additional_rules or ()) + tuple(rules)


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """Which part of the global batch this host feeds (T5X `DataLayout`).

  Attributes:
    batch_size: global batch size.
    shard_id: index of this host's data shard (for `seqio.ShardInfo`).
    num_shards: number of distinct data shards across hosts.
    is_first_host_in_replica_set: True for exactly one host per data shard
      (hosts that hold the same data shard read identical data).
  """
  batch_size: int
  shard_id: int
  num_shards: int
  is_first_host_in_replica_set: bool = True

  @property
  def per_host_batch_size(self) -> int:
    return self.batch_size // self.num_shards


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Arguments for `jax.distributed.initialize` (multi-host / TPU pods).

  All None on TPU pods and SLURM/GKE clusters lets JAX auto-detect them.
  """
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


def maybe_initialize_distributed(config: Optional[DistributedConfig]) -> None:
  """Calls `jax.distributed.initialize` once; must run before devices are used."""
  if config is None:
    return
  from jax._src import distributed as _distributed  # pylint: disable=g-import-not-at-top
  if getattr(_distributed.global_state, "client", None) is not None:
    return  # already initialized (e.g. by a launcher)
  jax.distributed.initialize(
      coordinator_address=config.coordinator_address,
      num_processes=config.num_processes,
      process_id=config.process_id)


@contextlib.contextmanager
def mesh_and_rules(mesh: Mesh, rules: LogicalAxisRules):
  """Activates `mesh` and the logical axis `rules` (for tracing and eager use)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


class PartitionedCallable:
  """A `jax.jit`-compiled function that runs under the partitioner's mesh/rules."""

  def __init__(self, jitted: Callable, mesh: Mesh, rules: LogicalAxisRules):
    self._jitted = jitted
    self._mesh = mesh
    self._rules = rules

  def _context(self):
    return mesh_and_rules(self._mesh, self._rules)

  def __call__(self, *args, **kwargs):
    with self._context():
      return self._jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with self._context():
      return self._jitted.lower(*args, **kwargs)


class Partitioner:
  """Mesh + logical axis rules + `partition()`; configure it in gin.

  Args:
    num_partitions: size of the ``model`` mesh axis (model parallelism); the
      ``data`` axis takes the remaining devices. Ignored if `mesh_shape` is set.
    mesh_shape: explicit ``(data, model)`` sizes; -1 in one place means
      "the remaining devices".
    logical_axis_rules: overrides `standard_logical_axis_rules()`.
    distributed: if set, `jax.distributed.initialize` is called before devices
      are queried (multi-host runs).
    devices: devices to use (default: all `jax.devices()`), mainly for tests.
  """

  def __init__(
      self,
      num_partitions: int = 1,
      mesh_shape: Optional[Sequence[int]] = None,
      logical_axis_rules: Optional[LogicalAxisRules] = None,
      distributed: Optional[DistributedConfig] = None,
      devices: Optional[Sequence[jax.Device]] = None,
  ):
    maybe_initialize_distributed(distributed)
    devices = list(devices if devices is not None else jax.devices())
    self._mesh = Mesh(
        np.asarray(devices).reshape(self._resolve_shape(len(devices), num_partitions, mesh_shape)),
        (DATA_AXIS, MODEL_AXIS))
    self._rules = tuple(
        tuple(r) for r in (logical_axis_rules
                           if logical_axis_rules is not None else standard_logical_axis_rules()))
    logging.info("Partitioner mesh %s, rules %s", dict(self._mesh.shape), self._rules)

  @staticmethod
  def _resolve_shape(num_devices, num_partitions, mesh_shape) -> Tuple[int, int]:
    if mesh_shape is None:
      if num_partitions < 1 or num_devices % num_partitions:
        raise PartitioningError(
            f"num_partitions={num_partitions} does not divide the {num_devices} devices")
      return num_devices // num_partitions, num_partitions
    shape = list(mesh_shape)
    if len(shape) != 2:
      raise PartitioningError(f"mesh_shape must be (data, model), got {mesh_shape}")
    if shape.count(-1) > 1:
      raise PartitioningError(f"at most one -1 in mesh_shape, got {mesh_shape}")
    if -1 in shape:
      known = int(np.prod([s for s in shape if s != -1]))
      if known <= 0 or num_devices % known:
        raise PartitioningError(f"mesh_shape {mesh_shape} does not fit {num_devices} devices")
      shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
      raise PartitioningError(
          f"mesh_shape {tuple(mesh_shape)} needs {int(np.prod(shape))} devices, "
          f"but {num_devices} are available")
    return shape[0], shape[1]

  # -- basic properties --------------------------------------------------------
  @property
  def mesh(self) -> Mesh:
    return self._mesh

  @property
  def logical_axis_rules(self) -> Tuple[Tuple[str, Optional[str]], ...]:
    return self._rules

  @property
  def num_data_shards(self) -> int:
    return self._mesh.shape[DATA_AXIS]

  @property
  def num_partitions(self) -> int:
    return self._mesh.shape[MODEL_AXIS]

  @property
  def data_partition_spec(self) -> PartitionSpec:
    """Batch arrays: leading (``batch``) axis over ``data``."""
    return self.logical_to_mesh_axes(PartitionSpec("batch"))

  @property
  def data_sharding(self) -> NamedSharding:
    return NamedSharding(self._mesh, self.data_partition_spec)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self._mesh, PartitionSpec())

  def rules_context(self):
    """Context making flax logical constraints resolve on this mesh (eager use)."""
    return mesh_and_rules(self._mesh, self._rules)

  # -- logical -> mesh ---------------------------------------------------------
  def logical_to_mesh_axes(self, logical_spec: Any) -> Any:
    """Logical `PartitionSpec` (tree) -> mesh `PartitionSpec` (tree)."""
    return nn.logical_to_mesh(logical_spec, self._rules)

  def to_shardings(self, mesh_axes: Any) -> Any:
    """Tree of mesh `PartitionSpec`s (None = replicated) -> `NamedSharding`s."""
    def one(spec):
      if isinstance(spec, jax.sharding.Sharding):
        return spec
      return NamedSharding(self._mesh, PartitionSpec() if spec is None else spec)
    return jax.tree_util.tree_map(
        one, mesh_axes,
        is_leaf=lambda x: x is None or isinstance(x, (PartitionSpec, jax.sharding.Sharding)))

  def params_mesh_axes(self, boxed_params: Any) -> Any:
    """Mesh specs for a (possibly abstract) tree of flax boxed parameters.

    Leaves without `nn.Partitioned` metadata are replicated.
    """
    logical = nn.get_partition_spec(boxed_params)
    return self.logical_to_mesh_axes(logical)

  def opt_state_mesh_axes(self, tx: optax.GradientTransformation, params_shapes: Any,
                          params_mesh_axes: Any) -> Any:
    """Mesh specs for ``tx.init(params)``.

    Optimizer leaves with the shape of their parameter (Adam moments) follow
    the parameter's spec; everything else (step counts, Adafactor's factored
    row/column statistics) is replicated.
    """
    opt_shapes = jax.eval_shape(tx.init, params_shapes)

    def for_param(leaf, param, spec):
      if getattr(leaf, "shape", None) == getattr(param, "shape", ()):
        return spec
      return PartitionSpec()

    return optax.tree_map_params(
        tx, for_param, opt_shapes, params_shapes, params_mesh_axes,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec))

  # -- compilation -------------------------------------------------------------
  def partition(
      self,
      fn: Callable,
      in_axis_resources: Any,
      out_axis_resources: Any,
      static_argnums: Sequence[int] = (),
      donate_argnums: Sequence[int] = (),
  ) -> PartitionedCallable:
    """`jax.jit(fn)` with inputs/outputs sharded by mesh `PartitionSpec` trees.

    `None` entries mean fully replicated (T5X/pjit semantics).
    """
    jitted = jax.jit(
        fn,
        in_shardings=self.to_shardings(in_axis_resources),
        out_shardings=self.to_shardings(out_axis_resources),
        static_argnums=tuple(static_argnums),
        donate_argnums=tuple(donate_argnums))
    return PartitionedCallable(jitted, self._mesh, self._rules)

  # -- data --------------------------------------------------------------------
  def get_data_layout(self, batch_size: Optional[int] = None,
                      host_index: Optional[int] = None) -> DataLayout:
    """Which data shard this host reads (hosts are grouped by ``data`` index)."""
    host_index = jax.process_index() if host_index is None else host_index
    devices = self._mesh.devices  # [data, model]
    # The set of data-axis positions each host owns; hosts with equal sets
    # hold the same slice of the batch and read the same data.
    host_rows = {}
    for row in range(devices.shape[0]):
      for dev in devices[row]:
        host_rows.setdefault(dev.process_index, set()).add(row)
    groups = sorted({tuple(sorted(r)) for r in host_rows.values()})
    mine = tuple(sorted(host_rows.get(host_index, ())))
    if mine not in groups:
      raise PartitioningError(f"host {host_index} owns no device of the mesh")
    shard_id = groups.index(mine)
    num_shards = len(groups)
    if batch_size is not None and batch_size % num_shards:
      raise PartitioningError(
          f"batch_size {batch_size} is not divisible by the {num_shards} data shards")
    if batch_size is not None and batch_size % self.num_data_shards:
      raise PartitioningError(
          f"batch_size {batch_size} is not divisible by the data mesh axis "
          f"({self.num_data_shards})")
    first = min(h for h, r in host_rows.items() if tuple(sorted(r)) == mine)
    return DataLayout(batch_size=batch_size or 0, shard_id=shard_id, num_shards=num_shards,
                      is_first_host_in_replica_set=(first == host_index))

  def host_local_to_global(self, batch: Any) -> Any:
    """Per-host numpy batch (tree) -> global `jax.Array`s sharded over ``data``."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(x)),
        batch)


def unbox(tree: Any) -> Any:
  """Strips flax partitioning metadata (``nn.Partitioned``) from a tree."""
  return flax_meta.unbox(tree)
