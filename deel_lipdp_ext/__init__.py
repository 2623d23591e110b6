"""deel-lipdp-ext: clipless differentially private training of Lipschitz networks
on Keras 3 / TensorFlow.

Example:
    >>> from deel_lipdp_ext import layers, losses, DPSequential, DPParameters

Importing the package imports Keras and registers every serialisable class, so
`keras.models.load_model` finds them after a plain `import deel_lipdp_ext`.
Only the `lipdp` command skips that (its accounting commands answer without
TensorFlow); there the same names are imported on first use.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_PUBLIC = {
    "accounting": (".accounting", None),
    "callbacks": (".callbacks", None),
    "data": (".data", None),
    "layers": (".layers", None),
    "losses": (".losses", None),
    "pipeline": (".pipeline", None),
    "compute_gradient_bounds": (".bounds", "compute_gradient_bounds"),
    "DatasetMetadata": (".data", "DatasetMetadata"),
    "DPModel": (".model", "DPModel"),
    "DPParameters": (".model", "DPParameters"),
    "DPSequential": (".model", "DPSequential"),
    "DP_Model": (".model", "DP_Model"),
    "DP_Sequential": (".model", "DP_Sequential"),
    # Modules that moved, still reachable at their old paths.
    "metrics": (".imaging.metrics", None),
    "dpsgd_manager": (".aijack.dpsgd_manager", None),
}
_MOVED = ("metrics", "dpsgd_manager")

__all__ = [name for name in _PUBLIC if name not in _MOVED] + ["__version__"]


def _resolve(name: str):
    module_name, attribute = _PUBLIC[name]
    module = importlib.import_module(module_name, __name__)
    return module if attribute is None else getattr(module, attribute)


def _launched_by_cli() -> bool:
    """True when the `lipdp` console script or `python -m deel_lipdp_ext` is
    importing the package."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script in ("lipdp", "lipdp.exe", "lipdp-script.py"):
        return True
    command = list(getattr(sys, "orig_argv", ()))
    return "-m" in command and command[command.index("-m") + 1 :][:1] == [__name__]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = _resolve(name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _launched_by_cli():
    for _name in __all__[:-1]:
        globals()[_name] = _resolve(_name)
    del _name
