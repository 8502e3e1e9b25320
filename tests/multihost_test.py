"""Multi-host training proven with real processes on localhost (issue 9).

`two_process_run` launches `multihost_worker.py` twice: one JAX job of 2
processes x 2 fake CPU devices (coordinator on 127.0.0.1, gloo collectives),
each process reading only its `seqio.ShardInfo` shard and training the toy
model of `trainer_test` with `p5jax.train.train` on a ``4x1`` and a ``2x2``
(data x model) mesh. This process (4 fake devices, see conftest) then checks:

* losses and final parameters equal a 1-process, 4-device run fed the same
  global batches (host 0's rows, then host 1's: the data-axis order);
* the hosts' shards are disjoint and together are the whole split;
* the checkpoint the 2 processes wrote restores here, in 1 process.

The pod/GPU gin files are checked with ``--gin.DRY_RUN=True`` under a faked
device count (16 / 8). Every child process has a deadline and is killed
(its whole process group) when the test fails or times out.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import seqio

from p5jax import checkpoints
from p5jax import partitioning
from p5jax import train as train_lib
from p5jax import trainer as trainer_lib
from p5jax import utils
import multihost_worker as worker
import train_test
import trainer_test

# Process startup (TensorFlow, SeqIO, JAX imports) dominates: ~1.5 min on a
# loaded 2-core machine.
pytestmark = pytest.mark.slow

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
STEPS = 3
MESHES = {"4x1": (4, 1), "2x2": (2, 2)}
RUN_TIMEOUT_S = 400


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(device_count: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={device_count} "
                      "--xla_backend_optimization_level=0")
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]))
  return env


def run_all(commands, envs, log_dir, timeout_s):
  """Runs `commands` (with `envs`) concurrently; all must exit 0 before `timeout_s`.

  Each child leads its own process group, so on any failure or timeout the
  survivors (e.g. a worker blocked in a collective whose peer died) are
  killed with everything they started.

  Returns:
    The stdout+stderr text of each command.
  """
  procs, logs = [], []
  try:
    for i, (cmd, env) in enumerate(zip(commands, envs)):
      log = open(os.path.join(log_dir, f"child_{i}.log"), "w+")
      logs.append(log)
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        why = f"child {failed[0]} exited with {procs[failed[0]].returncode}" if failed else (
            f"timed out after {timeout_s} s")
        pytest.fail(f"{why}\n" + _tails(logs))
      time.sleep(0.5)
    if any(p.returncode for p in procs):
      pytest.fail(f"exit codes {[p.returncode for p in procs]}\n" + _tails(logs))
    return [_read(log) for log in logs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for log in logs:
      log.close()


def _read(log) -> str:
  log.flush()
  log.seek(0)
  return log.read()


def _tails(logs, chars=3000) -> str:
  return "\n".join(f"--- child {i} ---\n{_read(log)[-chars:]}" for i, log in enumerate(logs))


# -- the 2-process run and its 1-process reference -------------------------------------------
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  coordinator = f"127.0.0.1:{free_port()}"
  t0 = time.perf_counter()
  run_all([[sys.executable, os.path.join(TESTS, "multihost_worker.py"),
            f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}",
            f"--out_dir={out}", f"--meshes={','.join(MESHES)}", f"--steps={STEPS}"]
           for i in range(2)], [child_env(2)] * 2, str(out), RUN_TIMEOUT_S)
  print(f"2-process run: {time.perf_counter() - t0:.1f} s")
  summaries = [json.load(open(out / f"process_{i}.json")) for i in range(2)]
  arrays = [dict(np.load(out / f"process_{i}.npz")) for i in range(2)]
  return out, summaries, arrays


def reference_run(mesh_shape):
  """1 process, 4 devices, the same global batches and seeds as the 2-process run."""
  partitioner = partitioning.Partitioner(mesh_shape=mesh_shape)
  assert jax.process_count() == 1 and partitioner.get_data_layout(8).num_shards == 1
  hosts = [utils.as_numpy_iterator(utils.get_dataset(
      worker.dataset_cfg(), shard, 2, seqio.EncDecFeatureConverter)) for shard in range(2)]
  batches = []
  for _ in range(STEPS):
    per_host = [next(it) for it in hosts]
    batches.append({k: np.concatenate([b[k] for b in per_host]) for k in per_host[0]})
  model = trainer_test.ToyModel()
  optimizer = worker.make_optimizer(STEPS)
  init_rng, dropout_seed = train_lib.train_rngs(worker.RANDOM_SEED)
  init_fn, abstract, axes = train_lib.create_train_state(
      model, optimizer, partitioner, {k: v.shape for k, v in batches[0].items()}, None, init_rng)
  state = init_fn(init_rng)
  trainer = trainer_lib.Trainer(model, optimizer, partitioner, axes, summary_dir=None,
                                rng_seed=dropout_seed)
  state, losses = trainer_test.step_through(trainer, partitioner, state, batches)
  return {"losses": losses, "state": jax.device_get(state.state_dict()), "abstract": abstract}


@pytest.fixture(scope="module")
def references():
  return {name: reference_run(shape) for name, shape in MESHES.items()}


def assert_trees_close(actual, expected):
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
      actual, expected)


# -- tests ---------------------------------------------------------------------------------------
def test_two_processes_form_one_job(two_process_run):
  _, summaries, _ = two_process_run
  for i, s in enumerate(summaries):
    assert (s["process_index"], s["process_count"]) == (i, 2)
    assert (s["local_device_count"], s["device_count"]) == (2, 4)
    for name, (data, model) in MESHES.items():
      m = s["meshes"][name]
      assert m["mesh"] == {"data": data, "model": model} and m["step"] == STEPS
      assert (m["shard_id"], m["num_shards"], m["per_host_batch_size"]) == (i, 2, 4)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_match_one_process(two_process_run, references, mesh):
  out, _, arrays = two_process_run
  ref = references[mesh]
  # Process 0 alone writes the TensorBoard events (one line per step).
  losses = train_test.read_scalars(str(out / mesh), "train/loss")
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], ref["losses"],
                             rtol=1e-5, atol=1e-5)
  expected = checkpoints.flat_shapes(ref["state"]["params"])
  prefix = f"{mesh}/params/"
  for host in arrays:
    got = {k[len(prefix):]: v for k, v in host.items() if k.startswith(prefix)}
    assert set(got) == set(expected)
    assert_trees_close(got, worker.flat_params(ref["state"]["params"]))


def test_hosts_read_disjoint_shards_covering_the_split(two_process_run):
  _, _, arrays = two_process_run
  full = utils.get_dataset(worker.dataset_cfg(shuffle=False), 0, 1,
                           seqio.EncDecFeatureConverter, num_epochs=1, drop_remainder=False)
  full_rows = [tuple(r) for b in full.as_numpy_iterator()
               for r in b["encoder_input_tokens"] if r.any()]
  assert len(full_rows) == 64 and len(set(full_rows)) == 64  # rows identify examples
  for mesh in MESHES:
    shards = [[tuple(r) for r in host[f"{mesh}/examples"]] for host in arrays]
    assert all(len(s) == 32 for s in shards)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(full_rows)


def test_two_process_checkpoint_restores_in_one_process(two_process_run, references):
  out, _, _ = two_process_run
  ref = references["2x2"]
  state_dir = out / "2x2" / f"checkpoint_{STEPS}" / checkpoints.STATE_ITEM
  # Both processes wrote their own shard files (no single writer, no clobbering).
  assert {p.name for p in state_dir.iterdir()} >= {"ocdbt.process_0", "ocdbt.process_1"}
  manager = checkpoints.CheckpointManager(str(out / "2x2"))
  try:
    state, position = manager.restore(ref["abstract"])
  finally:
    manager.close()
  assert int(state.step) == STEPS and position["batches_consumed"] == STEPS
  kernel = state.params["logits"]["kernel"]
  assert kernel.sharding.spec == partitioning.PartitionSpec(None, "model")
  assert_trees_close(jax.device_get(state.state_dict()), ref["state"])


# -- pod / GPU gin files: dry run with faked devices -------------------------------------------
DRY_RUNS = {
    "pod_t5_small_4x4.gin": (16, {"data": 16, "model": 1}),
    "pod_t5_base_4x4.gin": (16, {"data": 8, "model": 2}),
    "gpu8_t5_small.gin": (8, {"data": 8, "model": 1}),
    "gpu8_t5_base.gin": (8, {"data": 8, "model": 1}),
}


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
  """{gin file: JSON report} of concurrent ``python -m p5jax.train ... DRY_RUN`` runs."""
  out = tmp_path_factory.mktemp("dry_run")
  logs = run_all([[sys.executable, "-m", "p5jax.train", f"--gin_file=gin/experiments/{name}",
                   "--gin.DRY_RUN=True", f"--gin.MODEL_DIR='{out / 'model'}'"]
                  for name in DRY_RUNS],
                 [child_env(devices) for devices, _ in DRY_RUNS.values()], str(out),
                 timeout_s=300)
  # The report is the one JSON line on stdout (log lines go to stderr).
  reports = {name: json.loads([l for l in log.splitlines() if l.startswith("{")][-1])
             for name, log in zip(DRY_RUNS, logs)}
  # Nothing was trained or written.
  assert not (out / "model").exists()
  return reports


@pytest.mark.parametrize("gin_file", list(DRY_RUNS))
def test_pod_gin_dry_run_builds_mesh(dry_runs, gin_file):
  devices, mesh = DRY_RUNS[gin_file]
  report = dry_runs[gin_file]
  assert report["devices"] == devices and report["mesh"] == mesh
  assert report["global_batch"] == 256
  assert report["per_device_batch"] == 256 // mesh["data"]
