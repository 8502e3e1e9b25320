r"""One process of the multi-process training test (launched by `multihost_test.py`).

Every process runs this script with its own ``--process_id``; together they
form one JAX job through `jax.distributed` (coordinator on ``--coordinator``)
with CPU collectives (gloo). Each process owns the devices that
``XLA_FLAGS=--xla_force_host_platform_device_count`` fakes (2 in the test).

For each mesh in ``--meshes`` (``4x1`` = data 4, ``2x2`` = data 2 x model 2)
the process runs the real entry point, `p5jax.train.train`, on the toy model
and toy SeqIO task of `trainer_test` (its own data shard, orbax checkpoints
written by all processes into ``<out_dir>/<mesh>``), then writes to
``<out_dir>/process_<id>.npz``:

* ``<mesh>/params/<path>``: the final parameters, gathered to full arrays;
* ``<mesh>/examples``: the ``inputs`` of every example of the train split in
  this host's data shard (one epoch, unshuffled), rows zero-padded;

and a JSON summary ``process_<id>.json`` (devices, data layouts, steps).

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multihost_worker.py \
    --coordinator=127.0.0.1:12345 --num_processes=2 --process_id=0 --out_dir=/tmp/mh
"""
import argparse
import json
import os
import sys
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
import seqio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_test  # pylint: disable=g-import-not-at-top,wrong-import-position

from p5jax import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from p5jax import optimizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from p5jax import partitioning  # pylint: disable=g-import-not-at-top,wrong-import-position
from p5jax import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from p5jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from p5jax import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

# Settings shared with the single-process reference in `multihost_test.py`.
BATCH_SIZE = 8
RANDOM_SEED = 7
SHUFFLE_SEED = 3
LENGTHS = {"inputs": trainer_test.ENC_LEN, "targets": trainer_test.DEC_LEN}


def dataset_cfg(shuffle: bool = True) -> utils.DatasetConfig:
  return utils.DatasetConfig(
      mixture_or_task_name=trainer_test.register_toy_task(), task_feature_lengths=LENGTHS,
      split="train", batch_size=BATCH_SIZE, shuffle=shuffle, seed=SHUFFLE_SEED)


def make_optimizer(total_steps: int) -> optimizers.Optimizer:
  return optimizers.adamw(optimizers.linear_warmup_linear_decay(1e-2, total_steps=total_steps))


def parse_mesh(name: str):
  data, model = (int(x) for x in name.split("x"))
  return data, model


def shard_examples(layout: partitioning.DataLayout) -> np.ndarray:
  """``inputs`` rows of this host's shard of the train split (one pass, in order)."""
  ds = utils.get_dataset(dataset_cfg(shuffle=False), layout.shard_id, layout.num_shards,
                         seqio.EncDecFeatureConverter, num_epochs=1, drop_remainder=False)
  rows = np.concatenate([b["encoder_input_tokens"] for b in ds.as_numpy_iterator()])
  return rows[rows.any(axis=1)]  # drop the all-zero rows padding the last batch


def flat_params(params) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(checkpoints._key_name(k) for k in path): np.asarray(v)  # pylint: disable=protected-access
          for path, v in flat}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--coordinator", required=True, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--meshes", default="4x1,2x2")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args(argv)
  # Each process compiles its own programs; a cache shared between the
  # processes of one job would only add file races to the test.
  jax.config.update("jax_enable_compilation_cache", False)
  t0 = time.perf_counter()
  distributed = partitioning.DistributedConfig(
      coordinator_address=args.coordinator, num_processes=args.num_processes,
      process_id=args.process_id)
  summary = {"meshes": {}}
  arrays = {}
  for mesh_name in args.meshes.split(","):
    partitioner = partitioning.Partitioner(mesh_shape=parse_mesh(mesh_name),
                                           distributed=distributed)
    layout = partitioner.get_data_layout(BATCH_SIZE)
    step, state = train_lib.train(
        model=trainer_test.ToyModel(), optimizer=make_optimizer(args.steps),
        train_dataset_cfg=dataset_cfg(),
        model_dir=os.path.join(args.out_dir, mesh_name), total_steps=args.steps,
        checkpoint_cfg=checkpoints.CheckpointConfig(
            save=checkpoints.SaveCheckpointConfig(period=args.steps)),
        partitioner=partitioner,
        trainer_config=trainer_lib.TrainerConfig(log_every_steps=1),
        eval_period=1000, random_seed=RANDOM_SEED, inference_evaluator_cls=None)
    # Parameters sharded over `model` span both processes: gather them.
    params = multihost_utils.process_allgather(state.params, tiled=True)
    arrays.update({f"{mesh_name}/params/{k}": v for k, v in flat_params(params).items()})
    arrays[f"{mesh_name}/examples"] = shard_examples(layout)
    summary["meshes"][mesh_name] = {
        "mesh": dict(partitioner.mesh.shape), "step": step,
        "shard_id": layout.shard_id, "num_shards": layout.num_shards,
        "per_host_batch_size": layout.per_host_batch_size}
  summary.update(process_index=jax.process_index(), process_count=jax.process_count(),
                 local_device_count=jax.local_device_count(),
                 device_count=jax.device_count(), seconds=time.perf_counter() - t0)
  prefix = os.path.join(args.out_dir, f"process_{args.process_id}")
  np.savez(prefix + ".tmp.npz", **arrays)
  os.replace(prefix + ".tmp.npz", prefix + ".npz")
  with open(prefix + ".json.tmp", "w") as f:
    json.dump(summary, f)
  os.replace(prefix + ".json.tmp", prefix + ".json")
  # Leave together: process 0 hosts the coordinator service.
  multihost_utils.sync_global_devices("multihost_worker_done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
