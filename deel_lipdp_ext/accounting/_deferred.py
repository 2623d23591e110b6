"""Load dp-accounting's PLD library only when a PLD is computed.

`import dp_accounting` imports its PLD subpackage, which imports
`scipy.signal` and `scipy.stats`: about half a second, most of what the
`lipdp epsilon` command (RDP by default) would spend. Importing this module
(first thing `deel_lipdp_ext.accounting` does) before dp-accounting is first
imported makes `dp_accounting.pld` a lazy module: it runs on its first
attribute access, transparently.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

_DEFERRED = "dp_accounting.pld"


def defer_pld_import() -> None:
    """Import dp-accounting with `dp_accounting.pld` a lazy module, unless it
    is imported already.

    The package is imported as Python's import system does (module from its
    spec, registered, then run), with one difference: its `pld` attribute is
    set beforehand to the lazy module, so the package's `from dp_accounting
    import pld` binds it without running it.
    """
    if "dp_accounting" in sys.modules:
        return
    spec = importlib.util.find_spec("dp_accounting")  # does not run it
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    pld_spec = importlib.machinery.PathFinder.find_spec(
        _DEFERRED, list(spec.submodule_search_locations)
    )
    if pld_spec is None or pld_spec.loader is None:
        return
    pld_spec.loader = importlib.util.LazyLoader(pld_spec.loader)
    pld = importlib.util.module_from_spec(pld_spec)
    package = importlib.util.module_from_spec(spec)
    package.pld = pld
    sys.modules[_DEFERRED] = pld
    sys.modules["dp_accounting"] = package
    try:
        pld_spec.loader.exec_module(pld)
        spec.loader.exec_module(package)
    except BaseException:
        sys.modules.pop("dp_accounting", None)
        sys.modules.pop(_DEFERRED, None)
        raise


defer_pld_import()
