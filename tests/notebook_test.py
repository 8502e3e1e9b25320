"""Executes colab/p5jax_quickstart.ipynb at tiny size so the notebook cannot rot.

The notebook's parameters cell (tagged ``parameters``, papermill style) is
followed by an injected cell with tiny values: a MovieLens-format fixture as
RAW_DIR (no download), a 1+1-layer T5, 2 training steps, 2 examples of two
eval prompts. The kernel is this interpreter, declared in a kernel spec under
a temporary JUPYTER_PATH (nothing is installed into the user's Jupyter dirs).
"""
import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests import fixtures  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, "colab", "p5jax_quickstart.ipynb")
KERNEL_NAME = "p5jax-test"

TINY_BINDINGS = [
    # One family: a mixture of all three costs seconds of tf.data tracing per use.
    "MIXTURE_OR_TASK_NAME = 'p5_ml100k_sequential'",
    "BATCH_SIZE = 4",
    "TASK_FEATURE_LENGTHS = {'inputs': 128, 'targets': 16}",
    "SAVING_PERIOD = 2",
    "EVAL_STEPS = 1",
    "LOG_EVERY_STEPS = 1",
    "EVAL_BATCH_SIZE = 4",
    "BEAM_SIZE = 10",
    "train/utils.DatasetConfig.pack = False",
    # The teacher-forced eval of the training loop is covered by train_test.
    "train_script.train.train_eval_dataset_cfg = None",
    "network.T5Config.d_model = 16",
    "network.T5Config.num_heads = 2",
    "network.T5Config.head_dim = 8",
    "network.T5Config.d_ff = 32",
    "network.T5Config.num_encoder_layers = 1",
    "network.T5Config.num_decoder_layers = 1",
]


def _kernel_spec(jupyter_dir: str) -> None:
  """A kernel spec running this interpreter with the test's XLA/TF settings."""
  folder = os.path.join(jupyter_dir, "kernels", KERNEL_NAME)
  os.makedirs(folder)
  env = {k: os.environ[k] for k in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")
         if k in os.environ}
  # One CPU device (as on a Colab CPU runtime): compiling for conftest's four
  # fake devices would only slow the run down.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")]
                                                     if p])
  with open(os.path.join(folder, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "p5jax test", "language": "python", "env": env}, f)


def _with_overrides(nb, overrides: dict):
  """Inserts an assignment cell after the ``parameters`` cell (as papermill does)."""
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  src = "# Injected by tests/notebook_test.py\n" + "\n".join(
      f"{k} = {v!r}" for k, v in overrides.items())
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(src))
  return nb


def _outputs(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        parts.append(out.get("text", ""))
      elif "data" in out:
        parts.append(out["data"].get("text/plain", ""))
        if "image/png" in out["data"]:
          parts.append("<image/png>")
  return "\n".join(parts)


def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
  raw_dir = fixtures.write_movielens_grouplens(tmp_path / "raw", fixtures.make_world())
  model_dir = str(tmp_path / "model")
  jupyter_dir = str(tmp_path / "jupyter")
  _kernel_spec(jupyter_dir)
  monkeypatch.setenv("JUPYTER_PATH", jupyter_dir)

  nb = _with_overrides(nbformat.read(NOTEBOOK, as_version=4), {
      "MODEL_DIR": model_dir,
      "DATA_DIR": str(tmp_path / "data"),
      "RAW_DIR": raw_dir,
      "TRAIN_STEPS": 2,
      "EVAL_MIXTURE": "p5_ml100k_unseen",
      "EVAL_MAX_EXAMPLES": 2,
      "RECOMMEND_USER": "1",
      "GIN_BINDINGS": TINY_BINDINGS,
  })
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=240,
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.time()
  try:
    client.execute()
  finally:
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # for debugging a failure
  print(f"notebook executed in {time.time() - start:.1f} s")

  text = _outputs(nb)
  assert "git clone" not in text  # p5jax is importable: the install cell did nothing
  assert "| task | prompt | family | seen | examples |" in text
  for task in ("p5_ml100k_rating_1_10", "p5_ml100k_sequential_2_13", "p5_ml100k_direct_5_8"):
    assert f"| {task} |" in text
  assert "user_1 (" in text and "top 10 recommendations" in text
  assert "   1. item_" in text and "  10. item_" in text
  assert "<image/png>" in text  # the per-prompt plot was displayed
  assert "inputs (" in text and "targets (" in text  # rendered prompts were shown
  with open(os.path.join(model_dir, "eval", "results.json")) as f:
    rows = json.load(f)["rows"]
  assert sorted(r["prompt"] for r in rows) == ["1-10", "2-13", "5-8"]
  assert all(r["examples"] == 2 for r in rows)
  assert os.path.isdir(os.path.join(model_dir, "checkpoint_2"))
