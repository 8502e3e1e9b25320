r"""Converts a Hugging Face T5 checkpoint folder into p5jax parameters (orbax).

A user who has ``t5-small`` / ``t5-base`` (or T5 v1.1) weights on disk can
fine-tune P5 from them::

  python -m p5jax.convert --hf_dir=/path/to/t5-small --out=/ckpts/t5_small_p5jax

The folder is what ``save_pretrained`` writes: ``config.json`` plus
``model.safetensors`` (or a sharded ``model.safetensors.index.json``) or
``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``; torch is
then needed). The output is an orbax checkpoint of the `network.Transformer`
``params`` tree (plain float32 arrays, no logical-axis boxes); the CLI also
writes ``<out>.t5_config.gin`` with the matching `network.T5Config` bindings. The
tokenizer is the user's ``spiece.model`` via ``seqio.SentencePieceVocabulary``.

HF -> p5jax naming (HF ``Linear`` weights are ``[out, in]``; our kernels are
``[in, ...out]``)::

  shared.weight [V, D]                        -> token_embedder/embedding
  {enc,dec}oder.block.0.layer.0.SelfAttention
      .relative_attention_bias.weight [R, H]  -> {enc,dec}oder/relpos_bias/rel_embedding [H, R]
  *.{q,k,v}.weight [H*Dh, D]                  -> */{query,key,value}/kernel [D, H, Dh]
  *.o.weight [D, H*Dh]                        -> */out/kernel [H, Dh, D]
  *.DenseReluDense.{wi,wi_0,wi_1,wo}.weight   -> */mlp/{...}/kernel (transposed)
  *.layer_norm.weight, *.final_layer_norm.weight -> */scale
  lm_head.weight [V, D] (untied only)         -> decoder/logits_dense/kernel [D, V]

The head is untied when ``config.json`` says ``tie_word_embeddings: false`` or,
as transformers 5 decides, when ``lm_head.weight`` is stored and differs from
``shared.weight``. Decoder outputs are scaled by ``d_model**-0.5`` when
``scale_decoder_outputs`` (transformers 5) or else ``tie_word_embeddings``
(transformers 4; default true) is set.
"""
import json
import os
import sys
from typing import Any, Dict, Mapping, Tuple

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

from p5jax import network

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
CONFIG_GIN_FILE = "t5_config.gin"

SUPPORTED_MODEL_TYPES = ("t5", "mt5")
# Keys HF stores that carry no extra information for us.
_IGNORED_KEYS = (
    "encoder.embed_tokens.weight",  # tied to shared.weight
    "decoder.embed_tokens.weight",  # tied to shared.weight
    # Older checkpoints store an unused cross-attention bias table.
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)

# T5Config fields a caller may change without changing the parameter tree.
_OVERRIDABLE_FIELDS = frozenset({"dropout_rate", "dtype"})

Params = Dict[str, Any]


class ConversionError(ValueError):
  """A checkpoint folder that cannot be converted (message names file and field)."""


# ------------------------------------------------------------------- reading


def _read_config(hf_dir: str) -> Dict[str, Any]:
  path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: missing; expected a Hugging Face T5 folder written by "
                          "save_pretrained (config.json + model.safetensors).")
  try:
    with open(path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}:{e.lineno}: invalid JSON ({e.msg}).") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: expected a JSON object.")
  return config


def load_hf_state_dict(hf_dir: str) -> Dict[str, np.ndarray]:
  """Reads all tensors of a HF checkpoint folder as float32 numpy arrays."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  single = os.path.join(hf_dir, SAFETENSORS_FILE)
  index = os.path.join(hf_dir, SAFETENSORS_INDEX_FILE)
  torch_file = os.path.join(hf_dir, TORCH_FILE)
  tensors: Dict[str, Any] = {}
  if os.path.isfile(single):
    tensors = load_file(single)
  elif os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ConversionError(f"{index}: expected JSON with a 'weight_map' object ({e}).") from e
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(hf_dir, shard)
      if not os.path.isfile(shard_path):
        raise ConversionError(f"{index}: weight_map names shard {shard!r}, which is missing.")
      tensors.update(load_file(shard_path))
  elif os.path.isfile(torch_file):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError(f"{torch_file}: reading PyTorch checkpoints needs `torch`; install "
                            "it or save the model with safe_serialization=True.") from e
    state = torch.load(torch_file, map_location="cpu", weights_only=True)
    tensors = {k: v.detach().float().numpy() for k, v in state.items()}
  else:
    raise ConversionError(f"{hf_dir}: no weights found; expected {SAFETENSORS_FILE}, "
                          f"{SAFETENSORS_INDEX_FILE} or {TORCH_FILE}.")
  return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _weights_source(hf_dir: str) -> str:
  for name in (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, TORCH_FILE):
    if os.path.isfile(os.path.join(hf_dir, name)):
      return os.path.join(hf_dir, name)
  return hf_dir


# -------------------------------------------------------------------- config


def config_from_hf(hf_config: Mapping[str, Any], *, untied_head: bool,
                   source: str = CONFIG_FILE, **overrides) -> network.T5Config:
  """Builds the `T5Config` equivalent to a HF ``config.json`` dict.

  Args:
    hf_config: parsed config.json.
    untied_head: whether the checkpoint has its own ``lm_head.weight``.
    source: file name used in error messages.
    **overrides: non-architectural `T5Config` fields (e.g. dropout_rate, dtype).
  """
  model_type = hf_config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConversionError(f"{source}: model_type={model_type!r} is not supported; only T5 "
                          f"checkpoints ({', '.join(SUPPORTED_MODEL_TYPES)}) can be converted.")
  if hf_config.get("is_encoder_decoder", True) is False:
    raise ConversionError(f"{source}: is_encoder_decoder=false; only encoder-decoder T5 "
                          "checkpoints are supported.")
  proj = hf_config.get("feed_forward_proj", "relu")
  if proj not in network.FEED_FORWARD_PROJ:
    raise ConversionError(f"{source}: feed_forward_proj={proj!r} is not supported; use one of "
                          f"{sorted(network.FEED_FORWARD_PROJ)}.")

  def field(name, default=None):
    value = hf_config.get(name, default)
    if value is None:
      raise ConversionError(f"{source}: required field {name!r} is missing.")
    return value

  num_layers = field("num_layers")
  tie = bool(hf_config.get("tie_word_embeddings", True))
  scale = hf_config.get("scale_decoder_outputs")
  if scale is None:
    scale = tie  # transformers 4: tied heads are scaled (v1.0), untied are not (v1.1).
  fields = dict(
      vocab_size=field("vocab_size"),
      d_model=field("d_model"),
      num_heads=field("num_heads"),
      head_dim=field("d_kv"),
      d_ff=field("d_ff"),
      num_encoder_layers=num_layers,
      num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
      dropout_rate=float(hf_config.get("dropout_rate", 0.1)),
      feed_forward_proj=proj,
      tie_word_embeddings=not untied_head,
      scale_decoder_outputs=bool(scale),
      relative_attention_num_buckets=field("relative_attention_num_buckets", 32),
      relative_attention_max_distance=field("relative_attention_max_distance", 128),
      layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-6)),
  )
  bad = set(overrides) - _OVERRIDABLE_FIELDS
  if bad:
    raise ConversionError(f"Cannot override {sorted(bad)} when converting {source}: only "
                          f"{sorted(_OVERRIDABLE_FIELDS)} leave the parameters unchanged.")
  fields.update(overrides)
  try:
    return network.T5Config(**fields)
  except network.ConfigError as e:
    raise ConversionError(f"{source}: {e}") from e


# ------------------------------------------------------------------- mapping


def _attention(sd, prefix, num_heads, head_dim, used) -> Params:
  def take(name):
    used.add(f"{prefix}.{name}.weight")
    return sd[f"{prefix}.{name}.weight"]

  d_model = sd[f"{prefix}.q.weight"].shape[1]
  out = {}
  for hf, ours in (("q", "query"), ("k", "key"), ("v", "value")):
    out[ours] = {"kernel": take(hf).T.reshape(d_model, num_heads, head_dim)}
  out["out"] = {"kernel": take("o").T.reshape(num_heads, head_dim, d_model)}
  return out


def _mlp(sd, prefix, gated, used) -> Params:
  names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  out = {}
  for name in names:
    key = f"{prefix}.DenseReluDense.{name}.weight"
    used.add(key)
    out[name] = {"kernel": sd[key].T}
  return out


def _norm(sd, key, used) -> Params:
  used.add(key)
  return {"scale": sd[key]}


def params_from_state_dict(sd: Mapping[str, np.ndarray], config: network.T5Config,
                           source: str = "checkpoint") -> Params:
  """Maps a HF T5 state dict onto the `network.Transformer` params tree.

  Raises:
    ConversionError: a tensor is missing, has the wrong shape, or is unknown.
  """
  sd = dict(sd)
  if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
    sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
  H, Dh, gated = config.num_heads, config.head_dim, len(config.mlp_activations) > 1
  used = set()
  try:
    params = {"token_embedder": {"embedding": sd["shared.weight"]}}
    used.add("shared.weight")
    for stack, n_layers in (("encoder", config.num_encoder_layers),
                            ("decoder", config.num_decoder_layers)):
      bias_key = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
      used.add(bias_key)
      tree = {"relpos_bias": {"rel_embedding": sd[bias_key].T}}
      for i in range(n_layers):
        b = f"{stack}.block.{i}.layer"
        if stack == "encoder":
          tree[f"layers_{i}"] = {
              "pre_attention_layer_norm": _norm(sd, f"{b}.0.layer_norm.weight", used),
              "attention": _attention(sd, f"{b}.0.SelfAttention", H, Dh, used),
              "pre_mlp_layer_norm": _norm(sd, f"{b}.1.layer_norm.weight", used),
              "mlp": _mlp(sd, f"{b}.1", gated, used),
          }
        else:
          tree[f"layers_{i}"] = {
              "pre_self_attention_layer_norm": _norm(sd, f"{b}.0.layer_norm.weight", used),
              "self_attention": _attention(sd, f"{b}.0.SelfAttention", H, Dh, used),
              "pre_cross_attention_layer_norm": _norm(sd, f"{b}.1.layer_norm.weight", used),
              "encoder_decoder_attention": _attention(sd, f"{b}.1.EncDecAttention", H, Dh, used),
              "pre_mlp_layer_norm": _norm(sd, f"{b}.2.layer_norm.weight", used),
              "mlp": _mlp(sd, f"{b}.2", gated, used),
          }
      norm_name = f"{stack}_norm"
      tree[norm_name] = _norm(sd, f"{stack}.final_layer_norm.weight", used)
      params[stack] = tree
    if not config.tie_word_embeddings:
      used.add("lm_head.weight")
      params["decoder"]["logits_dense"] = {"kernel": sd["lm_head.weight"].T}
  except KeyError as e:
    raise ConversionError(f"{source}: tensor {e.args[0]!r} is missing for the architecture in "
                          f"{CONFIG_FILE} ({config.num_encoder_layers}+"
                          f"{config.num_decoder_layers} layers, {config.feed_forward_proj}).")
  except ValueError as e:  # reshape of a tensor with the wrong size
    raise ConversionError(f"{source}: a tensor does not match {CONFIG_FILE} ({e}).") from e

  ignorable = set(_IGNORED_KEYS) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
  unknown = sorted(set(sd) - used - ignorable)
  if unknown:
    raise ConversionError(f"{source}: unexpected tensors {unknown[:5]}"
                          f"{' ...' if len(unknown) > 5 else ''} (layer counts in "
                          f"{CONFIG_FILE} smaller than the checkpoint?).")
  _check_shapes(params, config, source)
  return params


def _check_shapes(params: Params, config: network.T5Config, source: str) -> None:
  """Compares against the shapes `network.Transformer(config)` initialises."""
  expected = expected_param_shapes(config)
  got = {k: v.shape for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
  for key, shape in expected.items():
    if key not in got:
      raise ConversionError(f"{source}: no tensor for parameter {key}.")
    if tuple(got[key]) != tuple(shape):
      raise ConversionError(f"{source}: parameter {key} has shape {tuple(got[key])}, the "
                            f"config in {CONFIG_FILE} needs {tuple(shape)}.")
  extra = sorted(set(got) - set(expected))
  if extra:
    raise ConversionError(f"{source}: parameters {extra} have no place in the network.")


def expected_param_shapes(config: network.T5Config) -> Dict[str, Tuple[int, ...]]:
  """Flat {'encoder/layers_0/...': shape} of `Transformer(config)` params."""
  tokens = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(
      lambda: network.Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                               enable_dropout=False))
  params = flax.core.meta.unbox(shapes["params"])
  return {k: tuple(v.shape)
          for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


# ----------------------------------------------------------------- public API


def convert_hf_checkpoint(hf_dir: str, **config_overrides) -> Tuple[network.T5Config, Params]:
  """Reads a HF T5 folder; returns (T5Config, params) for `network.Transformer`.

  Args:
    hf_dir: folder with config.json and model.safetensors / pytorch_model.bin.
    **config_overrides: non-architectural T5Config fields (dropout_rate, dtype).

  Returns:
    The config and a nested dict of float32 numpy arrays (unboxed params).
  """
  if not os.path.isdir(hf_dir):
    raise ConversionError(f"{hf_dir}: not a directory.")
  hf_config = _read_config(hf_dir)
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  # Validate the config before reading possibly large weights.
  config_from_hf(hf_config, untied_head=False, source=config_path, **config_overrides)
  sd = load_hf_state_dict(hf_dir)
  weights_path = _weights_source(hf_dir)
  lm_head, shared = sd.get("lm_head.weight"), sd.get("shared.weight")
  if hf_config.get("tie_word_embeddings", True) is False:
    if lm_head is None:
      raise ConversionError(f"{config_path}: tie_word_embeddings=false but {weights_path} has "
                            "no 'lm_head.weight'.")
    untied = True
  else:
    untied = lm_head is not None and not (shared is not None and np.array_equal(lm_head, shared))
  config = config_from_hf(hf_config, untied_head=untied, source=config_path, **config_overrides)
  return config, params_from_state_dict(sd, config, source=weights_path)


def config_to_gin(config: network.T5Config) -> str:
  """`network.T5Config` gin bindings (dynamic-registration syntax)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  lines = ["# Written by p5jax.convert: the architecture of the converted checkpoint.",
           "from __gin__ import dynamic_registration", "from p5jax import network", ""]
  for f in dataclasses.fields(config):
    lines.append(f"network.T5Config.{f.name} = {getattr(config, f.name)!r}")
  return "\n".join(lines) + "\n"


def save_params(params: Params, out: str, *, overwrite: bool = False) -> str:
  """Writes params as an orbax (StandardCheckpointer) checkpoint at ``out``.

  Orbax writes into a temporary folder and renames it when complete, so a
  crash never leaves a half-written checkpoint. Returns the absolute path.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(out)
  if os.path.exists(path) and not overwrite:
    raise ConversionError(f"{path}: already exists (pass overwrite=True / --overwrite).")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, jax.tree.map(np.asarray, params), force=overwrite)
    ckptr.wait_until_finished()
  return path


def load_params(path: str) -> Params:
  """Restores a params tree written by `save_params` (numpy/jax arrays)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such checkpoint folder.")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


# ------------------------------------------------------------------------ CLI


def main(argv):
  """``python -m p5jax.convert --hf_dir=DIR --out=CKPT [--overwrite]``."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if not FLAGS.hf_dir or not FLAGS.out:
    raise app.UsageError("Both --hf_dir and --out are required.")
  try:
    config, params = convert_hf_checkpoint(FLAGS.hf_dir)
    path = save_params(params, FLAGS.out, overwrite=FLAGS.overwrite)
  except ConversionError as e:
    sys.exit(f"error: {e}")
  gin_path = path.rstrip("/") + "." + CONFIG_GIN_FILE
  tmp = gin_path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config_to_gin(config))
  os.replace(tmp, gin_path)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  print(f"wrote {path} ({n:,} parameters) and {gin_path}")


if __name__ == "__main__":
  # Flags live here so importing the library never defines global flags.
  flags.DEFINE_string("hf_dir", None, "Hugging Face T5 folder (config.json + weights).")
  flags.DEFINE_string("out", None, "Output orbax checkpoint folder.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out checkpoint.")
  app.run(main)
