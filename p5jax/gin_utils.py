"""T5X-style gin command lines: ``--gin_file``, ``--gin.X=V``, ``--gin_search_paths``.

``--gin.MODEL_DIR="'/tmp/m'"`` is shorthand for ``--gin_bindings="MODEL_DIR =
'/tmp/m'"`` (T5X's `rewrite_gin_args`). Files named in ``--gin_file`` and their
``include`` statements are looked up in the search paths: the current
directory, then the p5jax checkout (so ``gin/runs/pretrain.gin`` works from
anywhere), then ``--gin_search_paths``.

After parsing, `check_macros` turns gin's late, deep errors into one message:
a run file declares ``MODEL_DIR = %gin.REQUIRED`` and the user forgot (or
misspelled) ``--gin.MODEL_DIR`` -> `MissingMacroError` naming the macro and the
likely typo.
"""
import difflib
import os
import sys
from typing import Callable, Iterable, List, Optional, Sequence

import gin
from gin import config as gin_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MACRO = "gin.macro"
_REQUIRED_SELECTOR = "gin.REQUIRED/gin.constant"


class GinConfigError(ValueError):
  """A gin file or binding that cannot be parsed or applied."""


class MissingMacroError(GinConfigError):
  """A macro a run file requires (``%gin.REQUIRED``) was not set."""


def rewrite_gin_args(args: Sequence[str]) -> List[str]:
  """``--gin.NAME=VALUE`` -> ``--gin_bindings=NAME = VALUE`` (other args unchanged)."""
  out = []
  for arg in args:
    if arg.startswith("--gin."):
      if "=" not in arg:
        raise GinConfigError(f"{arg!r}: expected --gin.NAME=VALUE")
      name, value = arg[len("--gin."):].split("=", 1)
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
  return out


def _macros_defined() -> dict:
  return {scope: params.get("value") for (scope, selector), params in
          gin_config._CONFIG.items() if selector == _MACRO}  # pylint: disable=protected-access


def _macros_referenced() -> set:
  return {ref.scopes[0] for ref in gin_config.iterate_references(gin_config._CONFIG)  # pylint: disable=protected-access
          if ref.selector == _MACRO and ref.scopes}


def macro_value(name: str, default=None):
  """The value bound to macro `name` (evaluating references), or `default`."""
  if name not in _macros_defined():
    return default
  return gin.query_parameter(f"{name}/gin.macro.value")


def check_macros(user_bindings: Iterable[str] = ()) -> None:
  """Raises `MissingMacroError` for required-but-unset or undefined macros.

  Args:
    user_bindings: the ``--gin.X=`` bindings given by the user, used to point
      out misspellings (a macro set on the command line that nothing uses).
  """
  defined = _macros_defined()
  referenced = _macros_referenced()
  required = sorted(name for name, value in defined.items()
                    if isinstance(value, gin_config.ConfigurableReference)
                    and value.scoped_selector == _REQUIRED_SELECTOR)
  undefined = sorted(name for name in referenced if name not in defined)
  if not (required or undefined):
    return
  user_macros = set()
  for binding in user_bindings:
    name = binding.split("=", 1)[0].strip()
    if name and "." not in name and "/" not in name:
      user_macros.add(name)
  unused = sorted(user_macros - referenced)
  lines = []
  for name in required + undefined:
    verb = "is required but not set" if name in required else "is used but never defined"
    line = f"gin macro {name} {verb}; pass --gin.{name}=... (strings need inner quotes: " \
           f"--gin.{name}=\"'value'\")"
    close = difflib.get_close_matches(name, unused, n=1, cutoff=0.6)
    if close:
      line += f"; you set {close[0]}, which nothing uses -- a typo?"
    lines.append(line)
  raise MissingMacroError("\n".join(lines))


def import_task_module(gin_bindings: Sequence[str] = ()) -> None:
  """Imports the ``TASK_MODULE`` macro's module (a binding on the command line wins)."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = None
  for binding in gin_bindings:
    name, _, value = binding.partition("=")
    if name.strip() == "TASK_MODULE":
      module = value.strip().strip("'\"")
  if module is None and "TASK_MODULE" in _macros_defined():
    module = gin.query_parameter("TASK_MODULE/gin.macro.value")
  if module:
    importlib.import_module(module)


def parse_gin_flags(gin_search_paths: Sequence[str] = (),
                    gin_files: Sequence[str] = (),
                    gin_bindings: Sequence[str] = (),
                    skip_unknown: bool = False,
                    finalize_config: bool = True) -> None:
  """Parses gin files and bindings (T5X `gin_utils.parse_gin_flags`), then checks macros."""
  if not gin_files and not gin_bindings:
    raise GinConfigError("no --gin_file given (e.g. --gin_file=gin/experiments/ml100k_tiny.gin)")
  paths = [os.getcwd(), REPO_ROOT] + [os.path.abspath(p) for p in gin_search_paths]
  for path in reversed(paths):  # gin searches the most recently added path first
    gin.add_config_file_search_path(path)
  for f in gin_files:
    if not any(os.path.exists(os.path.join(p, f)) for p in paths) and not os.path.exists(f):
      raise GinConfigError(f"gin file {f!r} not found in the search paths {paths}")
  try:
    gin.parse_config_files_and_bindings(list(gin_files), [],
                                        skip_unknown=skip_unknown, finalize_config=False)
    # Task modules define configurables (e.g. `PromptConfig`): import them
    # before the command-line bindings, so those can configure them too.
    # Files and bindings are then parsed together again, so that bindings
    # can use the files' import aliases (`train_script.train...`).
    import_task_module(gin_bindings)
    gin.clear_config()
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings),
                                        skip_unknown=skip_unknown, finalize_config=False)
  except (ValueError, SyntaxError, ImportError, IOError) as e:
    raise GinConfigError(f"gin config error: {e}") from None
  check_macros(gin_bindings)
  if finalize_config:
    gin.finalize()


def model_from_run_config(config_path: Optional[str], use_config_data_dir: bool = True,
                          gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()):
  """Builds MODEL from a run's ``config.gin``; returns (model, TASK_MODULE, DATA_DIR).

  The file (plus any `gin_files` / `gin_bindings` overrides, parsed after it)
  is parsed strictly: its ``from ... import`` lines register every
  configurable it names. With `use_config_data_dir`, the run's own DATA_DIR
  (if it set one) becomes the data root before the model -- and its
  vocabulary -- is built. Clears any earlier gin config.
  """
  from p5jax.data import schema  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  files = ([config_path] if config_path else []) + list(gin_files)
  try:
    with gin.unlock_config():
      gin.parse_config_files_and_bindings(files, list(gin_bindings), skip_unknown=False,
                                          finalize_config=False)
    task_module = macro_value("TASK_MODULE", "tasks.mixtures")
    model_ref = gin.query_parameter("%MODEL")
    data_dir = macro_value("DATA_DIR")
  except (ValueError, SyntaxError, ImportError, IOError) as e:
    raise GinConfigError(f"{', '.join(files)}: cannot read the model config: {e}") from None
  if not isinstance(model_ref, gin.config.ConfigurableReference):
    raise GinConfigError(f"{', '.join(files)}: MODEL must be a configurable reference, got "
                         f"{model_ref!r}")
  if use_config_data_dir and isinstance(data_dir, str) and data_dir:
    schema.set_data_root(data_dir)
  # Let gin build the object the reference describes, as for any bound parameter.
  # Fully qualified: under `python -m` a module also exists as __main__.
  gin.bind_parameter(f"{__name__}.p5jax_run_model.model", model_ref)
  return _configured_model(), task_module, data_dir if isinstance(data_dir, str) else None


@gin.configurable("p5jax_run_model")
def _configured_model(model=gin.REQUIRED):
  return model


def summarize_gin_config(model_dir: str, summary_writer, step: int) -> None:
  """Writes the full gin config to ``model_dir/config.gin`` and as a text summary."""
  from p5jax import fileio  # pylint: disable=g-import-not-at-top
  config_str = gin.config_str()
  fileio.atomic_write(os.path.join(model_dir, "config.gin"), config_str.encode())
  if summary_writer is not None:
    md = "\n".join("    " + line for line in config_str.splitlines())
    summary_writer.write_texts(step, {"gin/operative_config": md})


def define_gin_flags():
  """Defines T5X's ``--gin_file``, ``--gin_bindings``, ``--gin_search_paths``; returns FLAGS."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_multi_string("gin_file", [], "gin files (searched in --gin_search_paths)")
  flags.DEFINE_multi_string("gin_bindings", [], "extra bindings; --gin.X=V is shorthand")
  flags.DEFINE_list("gin_search_paths", [], "extra directories for gin files and includes")
  return flags.FLAGS


def run(main: Callable[[Sequence[str]], None], argv: Optional[Sequence[str]] = None) -> None:
  """`absl.app.run` with ``--gin.X=`` support."""
  from absl import app  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  app.run(main, argv=rewrite_gin_args(argv))


def run_cli(body: Callable[[], None], is_user_error: Callable[[BaseException], bool],
            argv: Optional[Sequence[str]] = None) -> None:
  """`run` for a gin entry point that takes no positional arguments.

  An exception `is_user_error` accepts (bad input, named by its message) is
  printed as one ``error: ...`` line and exits 1; anything else raises with
  its traceback.
  """
  from absl import app  # pylint: disable=g-import-not-at-top

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    try:
      body()
    except Exception as e:  # pylint: disable=broad-except
      if not is_user_error(e):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  run(_main, argv)
