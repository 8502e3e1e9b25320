"""Tests of p5jax.convert: parity with Hugging Face T5 (PyTorch), files, errors, CLI.

The HF models are random tiny `T5ForConditionalGeneration`s built here and
written with `save_pretrained` (nothing is downloaded).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from p5jax import convert  # pylint: disable=g-import-not-at-top
from p5jax import network  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
TINY = dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=2,
            num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            dropout_rate=0.0)


def save_hf_model(path, style, seed=0, **kwargs):
  """Writes a random tiny HF T5 in v1.0 (relu, tied) or v1.1 (gated, untied) style."""
  torch.manual_seed(seed)
  fields = dict(TINY, **kwargs)
  if style == "v1.1":
    fields.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**fields)).eval()
  if style == "v1.1":
    # transformers 5 builds T5 with a tied head; a v1.1 checkpoint has its own.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, fields["d_model"]))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  out = {}
  for style in ("v1.0", "v1.1"):
    path = str(tmp_path_factory.mktemp(style.replace(".", "")))
    out[style] = (path, save_hf_model(path, style))
  return out


def padded_batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, VOCAB, (2, 24))  # longer than max_distance: log buckets used
  enc[0, 17:] = 0
  tgt = rng.randint(2, VOCAB, (2, 7))
  tgt[1, 5:] = 0
  dec_in = np.concatenate([np.zeros((2, 1), np.int64), tgt[:, :-1]], axis=1)
  return enc, dec_in, tgt


@pytest.mark.parametrize("style", ["v1.0", "v1.1"])
def test_logits_match_transformers(hf_models, style):
  path, hf_model = hf_models[style]
  config, params = convert.convert_hf_checkpoint(path)
  v10 = style == "v1.0"
  assert config.feed_forward_proj == ("relu" if v10 else "gated-gelu")
  assert config.tie_word_embeddings == v10 and config.scale_decoder_outputs == v10
  assert (config.num_encoder_layers, config.num_decoder_layers, config.head_dim) == (1, 2, 8)

  enc, dec_in, tgt = padded_batch()
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0).long(),
                        decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
  logits = jax.jit(lambda p, *a: network.Transformer(config).apply(
      {"params": p}, *a, enable_dropout=False))(params, enc, dec_in, tgt)
  real = tgt > 0  # padded target positions are masked differently by design
  diff = np.abs(np.asarray(logits) - expected)[real]
  assert diff.max() <= 1e-4, diff.max()
  assert np.abs(expected).max() > 1.0  # not trivially small logits


def test_only_non_architectural_overrides(hf_models):
  path, _ = hf_models["v1.0"]
  config, _ = convert.convert_hf_checkpoint(path, dropout_rate=0.2, dtype="bfloat16")
  assert config.dropout_rate == 0.2 and config.dtype == "bfloat16"
  with pytest.raises(convert.ConversionError, match="whole_word_vocab_size"):
    convert.convert_hf_checkpoint(path, whole_word_vocab_size=8)


def test_pytorch_bin_gives_same_params(hf_models, tmp_path):
  path, hf_model = hf_models["v1.1"]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  torch.save(hf_model.state_dict(), bin_dir / convert.TORCH_FILE)
  with open(os.path.join(path, convert.CONFIG_FILE)) as f:
    (bin_dir / convert.CONFIG_FILE).write_text(f.read())
  config_a, params_a = convert.convert_hf_checkpoint(path)
  config_b, params_b = convert.convert_hf_checkpoint(str(bin_dir))
  assert config_a == config_b
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_transformers4_style_untied_config(hf_models, tmp_path):
  """An old v1.1 folder says tie_word_embeddings=false and stores lm_head.weight."""
  path, _ = hf_models["v1.1"]
  old = tmp_path / "old"
  old.mkdir()
  with open(os.path.join(path, convert.CONFIG_FILE)) as f:
    cfg = json.load(f)
  cfg.pop("scale_decoder_outputs", None)
  cfg["tie_word_embeddings"] = False
  (old / convert.CONFIG_FILE).write_text(json.dumps(cfg))
  os.symlink(os.path.join(path, convert.SAFETENSORS_FILE), old / convert.SAFETENSORS_FILE)
  config, params = convert.convert_hf_checkpoint(str(old))
  assert not config.tie_word_embeddings and not config.scale_decoder_outputs
  assert params["decoder"]["logits_dense"]["kernel"].shape == (16, VOCAB)


def test_save_and_load_params_roundtrip(hf_models, tmp_path):
  _, params = convert.convert_hf_checkpoint(hf_models["v1.0"][0])
  out = convert.save_params(params, str(tmp_path / "ckpt"))
  restored = convert.load_params(out)
  jax.tree.map(np.testing.assert_array_equal, params, restored)
  with pytest.raises(convert.ConversionError, match="already exists"):
    convert.save_params(params, out)


def _folder(tmp_path, config=None, weights=True, source=None):
  d = tmp_path / "hf"
  d.mkdir()
  if config is not None:
    (d / convert.CONFIG_FILE).write_text(json.dumps(config))
  if weights and source:
    os.symlink(os.path.join(source, convert.SAFETENSORS_FILE), d / convert.SAFETENSORS_FILE)
  return str(d)


def _config(source, **changes):
  with open(os.path.join(source, convert.CONFIG_FILE)) as f:
    cfg = json.load(f)
  cfg.update(changes)
  return cfg


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "bart"}, r"config\.json: model_type='bart' is not supported"),
    ({"feed_forward_proj": "gated-silu"}, r"config\.json: feed_forward_proj='gated-silu'"),
    ({"d_model": None}, r"config\.json: required field 'd_model'"),
    ({"num_layers": 3}, r"model\.safetensors: tensor 'encoder\.block\.1\..*' is missing"),
    ({"num_decoder_layers": 1}, r"model\.safetensors: unexpected tensors \['decoder\.block\.1"),
    ({"d_kv": 4}, r"model\.safetensors: .*does not match config\.json|needs"),
])
def test_bad_config_errors_name_file_and_field(hf_models, tmp_path, changes, match):
  source = hf_models["v1.0"][0]
  with pytest.raises(convert.ConversionError, match=match):
    convert.convert_hf_checkpoint(_folder(tmp_path, _config(source, **changes), source=source))


def test_missing_files_are_named(hf_models, tmp_path):
  source = hf_models["v1.0"][0]
  with pytest.raises(convert.ConversionError, match=r"config\.json: missing"):
    convert.convert_hf_checkpoint(_folder(tmp_path, None, source=source))
  other = tmp_path / "x"
  other.mkdir()
  (other / convert.CONFIG_FILE).write_text(json.dumps(_config(source)))
  with pytest.raises(convert.ConversionError,
                     match=r"no weights found; expected model\.safetensors"):
    convert.convert_hf_checkpoint(str(other))
  (other / convert.CONFIG_FILE).write_text("{\n  bad json")
  with pytest.raises(convert.ConversionError, match=r"config\.json:2: invalid JSON"):
    convert.convert_hf_checkpoint(str(other))
  untied_without_head = _config(source, tie_word_embeddings=False)
  (other / convert.CONFIG_FILE).write_text(json.dumps(untied_without_head))
  os.symlink(os.path.join(source, convert.SAFETENSORS_FILE), other / convert.SAFETENSORS_FILE)
  with pytest.raises(convert.ConversionError, match=r"tie_word_embeddings=false but .* 'lm_head"):
    convert.convert_hf_checkpoint(str(other))


def test_cli_writes_orbax_checkpoint_and_gin(hf_models, tmp_path):
  path, _ = hf_models["v1.1"]
  out = tmp_path / "t5_ckpt"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "p5jax.convert", f"--hf_dir={path}",
                         f"--out={out}"], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote" in proc.stdout
  restored = convert.load_params(str(out))
  _, expected = convert.convert_hf_checkpoint(path)
  jax.tree.map(np.testing.assert_array_equal, expected, restored)
  gin_text = (tmp_path / ("t5_ckpt." + convert.CONFIG_GIN_FILE)).read_text()
  assert "network.T5Config.feed_forward_proj = 'gated-gelu'" in gin_text
  assert "network.T5Config.tie_word_embeddings = False" in gin_text
