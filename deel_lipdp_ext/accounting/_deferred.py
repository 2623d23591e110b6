"""Import dp-accounting's submodules on demand, not its whole package.

`import dp_accounting` runs its `__init__`, which imports every subpackage:
the PLD library (scipy.signal, scipy.stats), the mechanism calibration
(scipy.optimize) and the Gaussian-mechanism helpers (scipy.stats), about
0.9 s of the `lipdp epsilon` command (RDP by default), which needs none.

Importing this module (first thing `deel_lipdp_ext.accounting` does) before
dp-accounting is imported registers the package module WITHOUT running its
`__init__`; its submodules import as usual (`from dp_accounting import
dp_event`, `from dp_accounting.rdp import rdp_privacy_accountant`). The
first access to any other package-level name (`dp_accounting.GaussianDpEvent`,
as code elsewhere writes) runs the real `__init__` then, transparently: every
name is there as after a plain import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

_PACKAGE = "dp_accounting"


def import_package_lazily() -> None:
    """Register dp-accounting's package module, its `__init__` deferred to
    the first access of a package-level name (nothing if it is imported)."""
    if _PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(_PACKAGE)  # finds it, does not run it
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)
    running = []

    def __getattr__(name: str):
        # Called only for names the module lacks. A submodule: import just it.
        # Anything else: run the package's __init__ (once), then look again.
        if not name.startswith("__"):
            if importlib.util.find_spec(f"{_PACKAGE}.{name}") is not None:
                return importlib.import_module(f"{_PACKAGE}.{name}")
            if not running:
                running.append(True)
                del package.__getattr__  # the real module from here on
                spec.loader.exec_module(package)
                return getattr(package, name)
        raise AttributeError(f"module {_PACKAGE!r} has no attribute {name!r}")

    package.__getattr__ = __getattr__
    sys.modules[_PACKAGE] = package


import_package_lazily()
