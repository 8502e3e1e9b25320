"""On-paper scaling model for T5 encoder-decoders (P5) on a `data x model` mesh.

Answers "how much memory per device, how many FLOPs per step, how long per step"
before anyone pays for a pod. Pure Python (no jax import), so it runs anywhere;
`benchmarks/scaling_model.py` is the command-line front end.

What is modelled (and what is not):

* Parameters: exact for the T5 architecture as built by T5X's
  ``examples/t5/network.py`` (and `p5jax.network`, whose parameter tree
  `param_specs` reproduces name for name): token embedding, optional untied
  ``logits_dense``, per-head q/k/v/o kernels (``[D, H, Dh]`` / ``[H, Dh, D]``),
  relu (``wi, wo``) or gated (``wi_0, wi_1, wo``) MLPs, RMS layer-norm scales
  (no biases anywhere), one relative-position bias table per stack
  (``num_heads x relative_attention_num_buckets``, shared by the stack's
  layers), and P5's whole-word embedding (``whole_word_vocab_size x d_model``)
  when enabled. t5-small (vocab 32128, tied) -> 60,506,624; t5-base ->
  222,903,552.
* Sharding: T5X's standard logical axis rules with 1-D parameter partitioning
  (`p5jax.partitioning.standard_logical_axis_rules()` defaults):
  ``vocab, mlp, heads, joined_kv -> model``; ``embed, kv, relpos_buckets ->
  None``; ``batch -> data``. Parameters are therefore sharded over `model` and
  replicated over `data`; a dimension that does not divide is padded (ceil).
* Optimizer state (fp32): ``adamw`` keeps two moments per parameter;
  ``adafactor`` (T5X/optax defaults: no momentum, ``min_dim_size_to_factor=128``)
  keeps a row and a column second-moment vector for tensors whose two largest
  dims are >= 128 and a full second moment otherwise. As in
  `p5jax.partitioning.Partitioner.opt_state_mesh_axes`, parameter-shaped state
  shards like its parameter and the (small) factored vectors are replicated.
  Gradients: one copy in ``param_dtype``.
* Activations: a rough per-layer count of the tensors kept for the backward
  pass (see `activation_bytes_per_device`); with ``remat=True`` it models
  T5X's full per-layer rematerialisation. XLA temporaries, dropout masks and
  fragmentation are not counted: against XLA's compiled memory analysis (CPU,
  fp32, no dropout, t5-small with vocab 8192 at batch 4-8 x 512/64) it reads
  16-27% low; `tests/scaling_test.py` keeps it within 2x on a tiny model.
* FLOPs: model FLOPs = 3 x forward (forward + backward), forward = 2 x
  (matmul params x tokens they see) + attention score/context matmuls; see
  `flops_per_step`. Remat adds one forward pass of hardware FLOPs, which MFU
  conventionally does not credit.
"""
import dataclasses
import math
from typing import Any, Optional, Sequence

GIB = 1024**3

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# T5X `standard_logical_axis_rules()` (activation and parameter partitioning
# dims = 1). Unlisted logical axes are replicated.
LOGICAL_AXIS_RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("relpos_buckets", None),
    ("length", None),
    ("layers", None),
)

# T5X / optax adafactor default: factor only if the two largest dims are this big.
ADAFACTOR_MIN_DIM_TO_FACTOR = 128


class ScalingError(ValueError):
  """A model / mesh / batch combination that cannot run as described."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The shape-determining fields of `p5jax.network.T5Config` (same names).

  Every function here duck-types its ``cfg`` argument, so a real `T5Config`
  works wherever a `ModelShape` does.
  """
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  head_dim: int = 64
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  feed_forward_proj: str = "relu"  # "relu" | "gated-gelu"
  tie_word_embeddings: bool = True
  relative_attention_num_buckets: int = 32
  whole_word_vocab_size: int = 0  # 0 = no P5 whole-word embedding


# Original T5 (v1.0) sizes; P5 used t5-small and t5-base.
PRESETS = {
    "t5_small": ModelShape(),
    "t5_base": ModelShape(d_model=768, num_heads=12, d_ff=3072,
                          num_encoder_layers=12, num_decoder_layers=12),
    "t5_large": ModelShape(d_model=1024, num_heads=16, d_ff=4096,
                           num_encoder_layers=24, num_decoder_layers=24),
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter tensor: flax path, shape and logical axis names."""
  name: str
  shape: tuple
  axes: tuple  # logical axis names; None = unnamed (replicated)

  @property
  def size(self) -> int:
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """A 2-D device mesh: `data` replicas x `model` shards."""
  data: int = 1
  model: int = 1

  @property
  def num_devices(self) -> int:
    return self.data * self.model

  def __str__(self) -> str:
    return f"{self.data}x{self.model}"


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """One training step: global batch, feature lengths, optimizer, dtypes."""
  global_batch: int = 128
  inputs_length: int = 512
  targets_length: int = 64
  optimizer: str = "adamw"  # P5's recipe; or "adafactor" (T5's)
  param_dtype: str = "float32"
  dtype: str = "bfloat16"  # activation / compute dtype
  remat: bool = False  # full per-layer rematerialisation


def _is_gated(cfg) -> bool:
  proj = cfg.feed_forward_proj
  if proj not in ("relu", "gated-gelu", "gelu", "gated-relu", "gated-silu"):
    raise ScalingError(f"feed_forward_proj={proj!r}: expected 'relu' or 'gated-*'")
  return proj.startswith("gated")


def _dtype_bytes(name: str) -> int:
  if name not in _DTYPE_BYTES:
    raise ScalingError(f"dtype {name!r}: expected one of {sorted(_DTYPE_BYTES)}")
  return _DTYPE_BYTES[name]


# ----------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------


def _attention_specs(prefix: str, d: int, heads: int, head_dim: int) -> list:
  # Per-head kernels [D, H, Dh] as in T5X/p5jax (this also decides Adafactor
  # factoring: Dh < 128, so attention kernels keep a full second moment).
  specs = [ParamSpec(f"{prefix}/{n}/kernel", (d, heads, head_dim), ("embed", "heads", "kv"))
           for n in ("query", "key", "value")]
  specs.append(ParamSpec(f"{prefix}/out/kernel", (heads, head_dim, d), ("heads", "kv", "embed")))
  return specs


def _mlp_specs(prefix: str, d: int, d_ff: int, gated: bool) -> list:
  wis = ("wi_0", "wi_1") if gated else ("wi",)
  specs = [ParamSpec(f"{prefix}/{n}/kernel", (d, d_ff), ("embed", "mlp")) for n in wis]
  specs.append(ParamSpec(f"{prefix}/wo/kernel", (d_ff, d), ("mlp", "embed")))
  return specs


def _norm(name: str, d: int) -> ParamSpec:
  return ParamSpec(f"{name}/scale", (d,), ("embed",))


def param_specs(cfg) -> list:
  """All parameter tensors of a T5 encoder-decoder, in T5X naming."""
  d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
  gated = _is_gated(cfg)
  buckets = getattr(cfg, "relative_attention_num_buckets", 32)
  specs = [ParamSpec("token_embedder/embedding", (cfg.vocab_size, d), ("vocab", "embed"))]
  ww = getattr(cfg, "whole_word_vocab_size", 0) or 0
  if ww:
    # Small table, replicated (first axis unnamed), as p5jax.network builds it.
    specs.append(ParamSpec("whole_word_embedder/embedding", (ww, d), (None, "embed")))
  for stack in ("encoder", "decoder"):
    specs.append(ParamSpec(f"{stack}/relpos_bias/rel_embedding",
                           (cfg.num_heads, buckets), ("heads", "relpos_buckets")))
  for i in range(cfg.num_encoder_layers):
    p = f"encoder/layers_{i}"
    specs.append(_norm(f"{p}/pre_attention_layer_norm", d))
    specs += _attention_specs(f"{p}/attention", d, h, dh)
    specs.append(_norm(f"{p}/pre_mlp_layer_norm", d))
    specs += _mlp_specs(f"{p}/mlp", d, cfg.d_ff, gated)
  specs.append(_norm("encoder/encoder_norm", d))
  for i in range(cfg.num_decoder_layers):
    p = f"decoder/layers_{i}"
    specs.append(_norm(f"{p}/pre_self_attention_layer_norm", d))
    specs += _attention_specs(f"{p}/self_attention", d, h, dh)
    specs.append(_norm(f"{p}/pre_cross_attention_layer_norm", d))
    specs += _attention_specs(f"{p}/encoder_decoder_attention", d, h, dh)
    specs.append(_norm(f"{p}/pre_mlp_layer_norm", d))
    specs += _mlp_specs(f"{p}/mlp", d, cfg.d_ff, gated)
  specs.append(_norm("decoder/decoder_norm", d))
  if not cfg.tie_word_embeddings:
    specs.append(ParamSpec("decoder/logits_dense/kernel", (d, cfg.vocab_size),
                           ("embed", "vocab")))
  return specs


def count_params(cfg) -> int:
  """Exact parameter count (t5-small, vocab 32128 tied: 60,506,624)."""
  return sum(s.size for s in param_specs(cfg))


# ----------------------------------------------------------------------------
# Memory per device
# ----------------------------------------------------------------------------


def _mesh_size(axis: Optional[str], mesh: MeshShape) -> int:
  return {"data": mesh.data, "model": mesh.model, None: 1}[axis]


def _shards(logical_axis: str, mesh: MeshShape) -> int:
  return _mesh_size(dict(LOGICAL_AXIS_RULES).get(logical_axis), mesh)


def shard_shape(shape: Sequence[int], axes: Sequence[str], mesh: MeshShape) -> tuple:
  """Per-device block of a tensor; uneven dims are padded as XLA does."""
  return tuple(-(-n // _shards(a, mesh)) for n, a in zip(shape, axes))


def param_bytes_per_device(cfg, mesh: MeshShape, param_dtype: str = "float32") -> int:
  """Parameter bytes on one device (sharded over `model`, replicated over `data`)."""
  nbytes = _dtype_bytes(param_dtype)
  return sum(math.prod(shard_shape(s.shape, s.axes, mesh)) for s in param_specs(cfg)) * nbytes


def _adafactor_state_elems(shape: tuple, axes: tuple, mesh: MeshShape) -> int:
  """Per-device second-moment elements for one tensor (factored if large)."""
  if len(shape) >= 2:
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    r, c = order[-1], order[-2]
    if shape[c] >= ADAFACTOR_MIN_DIM_TO_FACTOR:
      # v_row drops dim c, v_col drops dim r; replicated (not param-shaped).
      n = math.prod(shape)
      return n // shape[c] + n // shape[r]
  return math.prod(shard_shape(shape, axes, mesh))


def optimizer_bytes_per_device(cfg, mesh: MeshShape, optimizer: str = "adamw") -> int:
  """Optimizer-state bytes on one device (fp32 state, sharded like the params)."""
  specs = param_specs(cfg)
  if optimizer == "adamw":
    return 2 * 4 * sum(math.prod(shard_shape(s.shape, s.axes, mesh)) for s in specs)
  if optimizer == "adafactor":
    return 4 * sum(_adafactor_state_elems(s.shape, s.axes, mesh) for s in specs)
  raise ScalingError(f"optimizer={optimizer!r}: expected 'adamw' or 'adafactor'")


def _per_device_batch(setup: TrainSetup, mesh: MeshShape) -> int:
  if setup.global_batch % mesh.data:
    raise ScalingError(
        f"global batch {setup.global_batch} does not divide over data={mesh.data} "
        f"(mesh {mesh}); pick a batch that is a multiple of the data axis")
  return setup.global_batch // mesh.data


def _layer_activation_elems(cfg, mesh: MeshShape, b: int, le: int, ld: int) -> tuple:
  """Elements one encoder / one decoder layer keeps for backward, per device.

  Per token, with m = mesh.model and everything with a heads/mlp axis sharded
  over m (the d_model-wide residual stream is replicated over `model`):
    encoder: 4 x d (residual in, norm out, residual mid, norm out)
             + 4 x inner/m (q, k, v, attention context)
             + n_ff x d_ff/m (relu: pre/post activation = 2; gated: 4)
             + 2 x heads/m x L_enc (attention logits and probabilities)
    decoder: 6 x d + 6 x inner/m (self q, k, v, ctx; cross q, ctx)
             + n_ff x d_ff/m + 2 x heads/m x (L_dec + L_enc)
             and per *encoder* token 2 x inner/m (cross-attention k, v).
  """
  m = mesh.model
  d = cfg.d_model
  inner = -(-cfg.num_heads // m) * cfg.head_dim
  heads = -(-cfg.num_heads // m)
  d_ff = -(-cfg.d_ff // m)
  n_ff = 4 if _is_gated(cfg) else 2
  enc = b * le * (4 * d + 4 * inner + n_ff * d_ff + 2 * heads * le)
  dec = (b * ld * (6 * d + 6 * inner + n_ff * d_ff + 2 * heads * (ld + le))
         + b * le * 2 * inner)
  return enc, dec


def activation_bytes_per_device(cfg, mesh: MeshShape, setup: TrainSetup) -> int:
  """Rough activation bytes held for the backward pass on one device.

  No remat: every layer's tensors (see `_layer_activation_elems`) are alive at
  the start of the backward pass. Full remat: each layer keeps only its input
  (b x L x d) and one layer's tensors are live while it is recomputed. Both add
  the embedding outputs (b x (L_enc + L_dec) x d) and the logits, which T5X
  keeps in fp32 twice (logits, log-softmax) with the vocab sharded over `model`.
  """
  b = _per_device_batch(setup, mesh)
  le, ld = setup.inputs_length, setup.targets_length
  enc, dec = _layer_activation_elems(cfg, mesh, b, le, ld)
  ne, nd = cfg.num_encoder_layers, cfg.num_decoder_layers
  if setup.remat:
    layers = b * cfg.d_model * (ne * le + nd * ld) + max(enc, dec)
  else:
    layers = ne * enc + nd * dec
  embeds = b * (le + ld) * cfg.d_model
  act = (layers + embeds) * _dtype_bytes(setup.dtype)
  logits = 2 * 4 * b * ld * -(-cfg.vocab_size // mesh.model)
  return act + logits


# ----------------------------------------------------------------------------
# FLOPs and time
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """FLOPs of one global training step (all devices together)."""
  forward: float
  model: float  # 3 x forward: what MFU is measured against
  hardware: float  # model + one extra forward when rematerialising


def flops_per_step(cfg, setup: TrainSetup) -> FlopCount:
  """FLOPs of one training step.

  forward = 2 x B x [ N_enc x L_enc                  (encoder matmul params)
                    + N_dec x L_dec                  (decoder self-attn, cross q/o, MLP)
                    + N_xkv x L_enc                  (cross-attn k/v read encoder output)
                    + d_model x vocab x L_dec ]      (logits, tied or not)
          + 4 x B x inner x [ n_enc x L_enc^2
                            + n_dec x (L_dec^2 + L_dec x L_enc) ]  (QK^T and AV)
  Embedding lookups, norms, softmax and the loss are not counted (< 1%).
  Training = 3 x forward (backward is twice the forward); this equals the
  usual 6 x N x tokens with each token counted through the params it meets.
  """
  d, inner, d_ff = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.d_ff
  mlp = (3 if _is_gated(cfg) else 2) * d * d_ff
  n_enc = cfg.num_encoder_layers * (4 * d * inner + mlp)
  n_dec = cfg.num_decoder_layers * (4 * d * inner + 2 * d * inner + mlp)
  n_xkv = cfg.num_decoder_layers * 2 * d * inner
  le, ld, b = setup.inputs_length, setup.targets_length, setup.global_batch
  dense = 2 * b * (n_enc * le + n_dec * ld + n_xkv * le + d * cfg.vocab_size * ld)
  attn = 4 * b * inner * (cfg.num_encoder_layers * le * le
                          + cfg.num_decoder_layers * (ld * ld + ld * le))
  fwd = float(dense + attn)
  return FlopCount(forward=fwd, model=3 * fwd, hardware=(4 if setup.remat else 3) * fwd)


def step_time_s(model_flops: float, num_devices: int, peak_flops: float, mfu: float) -> float:
  """Seconds per step if `num_devices` chips reach `mfu` of `peak_flops` each."""
  if not 0 < mfu <= 1:
    raise ScalingError(f"mfu={mfu}: expected a fraction in (0, 1]")
  return model_flops / (num_devices * peak_flops * mfu)


# ----------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Everything the scaling model says about one (model, mesh, setup)."""
  model: str
  mesh: MeshShape
  setup: TrainSetup
  num_params: int
  param_bytes: int  # per device
  grad_bytes: int
  optimizer_bytes: int
  activation_bytes: int
  flops: FlopCount
  step_time_s: float
  tokens_per_s: float
  hbm_bytes: int

  @property
  def total_bytes(self) -> int:
    return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  def to_dict(self) -> dict:
    return {
        "model": self.model, "devices": self.mesh.num_devices,
        "mesh": {"data": self.mesh.data, "model": self.mesh.model},
        **dataclasses.asdict(self.setup),
        "num_params": self.num_params,
        "param_bytes_per_device": self.param_bytes,
        "grad_bytes_per_device": self.grad_bytes,
        "optimizer_bytes_per_device": self.optimizer_bytes,
        "activation_bytes_per_device": self.activation_bytes,
        "total_bytes_per_device": self.total_bytes, "hbm_bytes": self.hbm_bytes,
        "fits": self.fits, "model_flops_per_step": self.flops.model,
        "hardware_flops_per_step": self.flops.hardware,
        "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
    }


def estimate(cfg, mesh: MeshShape, setup: TrainSetup, *, name: str = "",
             peak_flops: float = 275e12, mfu: float = 0.4,
             hbm_bytes: int = 32 * GIB) -> Estimate:
  """Memory per device, FLOPs and step time of `cfg` trained on `mesh`."""
  params = param_bytes_per_device(cfg, mesh, setup.param_dtype)
  flops = flops_per_step(cfg, setup)
  t = step_time_s(flops.model, mesh.num_devices, peak_flops, mfu)
  tokens = setup.global_batch * (setup.inputs_length + setup.targets_length)
  return Estimate(
      model=name, mesh=mesh, setup=setup, num_params=count_params(cfg),
      param_bytes=params, grad_bytes=params,
      optimizer_bytes=optimizer_bytes_per_device(cfg, mesh, setup.optimizer),
      activation_bytes=activation_bytes_per_device(cfg, mesh, setup),
      flops=flops, step_time_s=t, tokens_per_s=tokens / t, hbm_bytes=hbm_bytes)


def candidate_meshes(cfg, num_devices: int, global_batch: int) -> list:
  """Meshes worth trying, least model parallelism first.

  `model` is a power of two that divides both the device count and num_heads
  (so heads shard evenly); `data` must divide the global batch.
  """
  out = []
  m = 1
  while m <= num_devices:
    if num_devices % m == 0 and cfg.num_heads % m == 0 and global_batch % (num_devices // m) == 0:
      out.append(MeshShape(data=num_devices // m, model=m))
    m *= 2
  if not out:
    raise ScalingError(
        f"no data x model mesh for {num_devices} devices: the global batch "
        f"{global_batch} and num_heads {cfg.num_heads} leave no valid split")
  return out


def choose_mesh(cfg, num_devices: int, setup: TrainSetup, hbm_bytes: int = 32 * GIB,
                **estimate_kwargs: Any) -> MeshShape:
  """Data-parallel as far as memory allows: the least `model` that fits in HBM.

  If nothing fits, the mesh with the smallest footprint (the caller sees
  `Estimate.fits == False` and should shrink the batch or turn on remat).
  """
  meshes = candidate_meshes(cfg, num_devices, setup.global_batch)
  ests = [estimate(cfg, mh, setup, hbm_bytes=hbm_bytes, **estimate_kwargs) for mh in meshes]
  for e in ests:
    if e.fits:
      return e.mesh
  return min(ests, key=lambda e: e.total_bytes).mesh


def markdown_table(estimates: Sequence[Estimate]) -> str:
  """One row per estimate; memory in GiB per device, FLOPs in TFLOP per step."""
  head = ("| model | devices | mesh (data x model) | batch/replica | params | "
          "params GiB/dev | grads GiB/dev | opt GiB/dev | act GiB/dev | "
          "total GiB/dev | fits | TFLOP/step | step ms | tokens/s |")
  rows = [head, "|" + "---|" * (head.count("|") - 1)]
  for e in estimates:
    rows.append(
        f"| {e.model} | {e.mesh.num_devices} | {e.mesh} | "
        f"{e.setup.global_batch // e.mesh.data} | {e.num_params / 1e6:.1f}M | "
        f"{e.param_bytes / GIB:.3f} | {e.grad_bytes / GIB:.3f} | "
        f"{e.optimizer_bytes / GIB:.3f} | {e.activation_bytes / GIB:.2f} | "
        f"{e.total_bytes / GIB:.2f} | {'yes' if e.fits else 'NO'} | "
        f"{e.flops.model / 1e12:.1f} | {e.step_time_s * 1e3:.1f} | {e.tokens_per_s:,.0f} |")
  return "\n".join(rows)
