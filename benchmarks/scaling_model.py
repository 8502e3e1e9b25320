r"""On-paper scaling table for T5-small/base/large P5 pretraining.

Prints a markdown table (memory per device, FLOPs per step, expected step
time) and one JSON line with the same numbers. The model behind it lives in
`p5jax.scaling` (formulas and assumptions are documented there).

  python benchmarks/scaling_model.py                      # TPU v4 defaults
  python benchmarks/scaling_model.py --peak_flops=989e12 --hbm_gib=80 \
      --devices=8                                          # 8 x H100 host
  python benchmarks/scaling_model.py --devices=16 --mesh=8x2 --remat

Mesh per device count: the least model parallelism whose per-device memory
fits in `--hbm_gib` (data-parallel until that fails), unless `--mesh` is given.
"""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from p5jax import scaling  # noqa: E402  (path set above for a source checkout)


def _parse_mesh(text: str) -> scaling.MeshShape:
  try:
    data, model = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh={text!r}: expected DATAxMODEL, e.g. 8x2")
  return scaling.MeshShape(data=data, model=model)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="t5_small,t5_base,t5_large",
                 help=f"comma-separated presets from {sorted(scaling.PRESETS)}")
  p.add_argument("--devices", default="1,8,32,256", help="comma-separated device counts")
  p.add_argument("--mesh", type=_parse_mesh, default=None,
                 help="force one DATAxMODEL mesh (overrides --devices)")
  p.add_argument("--batch", type=int, default=128, help="global batch (sequences)")
  p.add_argument("--inputs_length", type=int, default=512)
  p.add_argument("--targets_length", type=int, default=64)
  p.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw",
                 help="adamw: P5's recipe; adafactor: T5's")
  p.add_argument("--param_dtype", default="float32")
  p.add_argument("--dtype", default="bfloat16", help="activation dtype")
  p.add_argument("--remat", action="store_true", help="full per-layer rematerialisation")
  p.add_argument("--vocab_size", type=int, default=32128)
  p.add_argument("--whole_word_vocab_size", type=int, default=0,
                 help="P5 whole-word embedding rows (P5 uses 512; 0 = off)")
  p.add_argument("--peak_flops", type=float, default=275e12,
                 help="peak FLOP/s per device (TPU v4 bf16: 275e12; H100 SXM: 989e12)")
  p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
  p.add_argument("--hbm_gib", type=float, default=32.0,
                 help="memory per device (TPU v4: 32; H100: 80)")
  args = p.parse_args(argv)

  setup = scaling.TrainSetup(
      global_batch=args.batch, inputs_length=args.inputs_length,
      targets_length=args.targets_length, optimizer=args.optimizer,
      param_dtype=args.param_dtype, dtype=args.dtype, remat=args.remat)
  hbm = int(args.hbm_gib * scaling.GIB)
  kw = dict(peak_flops=args.peak_flops, mfu=args.mfu, hbm_bytes=hbm)
  rows = []
  try:
    for name in args.models.split(","):
      if name not in scaling.PRESETS:
        raise scaling.ScalingError(f"--models: unknown preset {name!r}; "
                                   f"choose from {sorted(scaling.PRESETS)}")
      cfg = dataclasses.replace(scaling.PRESETS[name], vocab_size=args.vocab_size,
                                whole_word_vocab_size=args.whole_word_vocab_size)
      if args.mesh:
        meshes = [args.mesh]
      else:
        meshes = [scaling.choose_mesh(cfg, int(n), setup, **kw)
                  for n in args.devices.split(",")]
      rows += [scaling.estimate(cfg, m, setup, name=name, **kw) for m in meshes]
  except scaling.ScalingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  print(f"global batch {args.batch}, lengths {args.inputs_length}/{args.targets_length}, "
        f"{args.optimizer}, params {args.param_dtype}, activations {args.dtype}, "
        f"remat {'on' if args.remat else 'off'}, peak {args.peak_flops:.3g} FLOP/s x "
        f"MFU {args.mfu}, {args.hbm_gib:g} GiB/device\n")
  print(scaling.markdown_table(rows))
  print(json.dumps({"benchmark": "scaling_model", "args": {
      k: (str(v) if isinstance(v, scaling.MeshShape) else v) for k, v in vars(args).items()},
      "rows": [r.to_dict() for r in rows]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
