"""The kernel layer: netlink (pyroute2, and packed messages for bulk neighbours), nftables, xfrm.

pyroute2's package __init__ imports all of pyroute2 (IPDB, NDB, wireless, IPVS, ...: 163 modules, 22 MiB and
0.3 s measured) to offer every class at the top level; pyoverlay uses IPRoute, IPSet and the netlink errors.
The package is registered here without running that __init__, so only the submodules imported load (102
modules, 16 MiB, 0.19 s). Anything asking the package itself for a name (`from pyroute2 import X`) gets the
real __init__ run then, once, so nothing else has to know.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _lean_pyroute2() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = types.ModuleType("pyroute2")
    package.__file__, package.__spec__ = spec.origin, spec
    package.__path__ = list(spec.submodule_search_locations)
    package.__loader__ = spec.loader

    def full(name: str) -> object:
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:   # `from pyroute2 import config`
            return importlib.import_module(f"pyroute2.{name}")
        del package.__getattr__          # the real __init__ defines what it defines; no second run
        spec.loader.exec_module(package)  # type: ignore[union-attr]
        return getattr(package, name)

    package.__getattr__ = full  # type: ignore[method-assign]
    sys.modules["pyroute2"] = package


_lean_pyroute2()
