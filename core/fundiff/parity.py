"""Reference implementations from other libraries, for parity checks (tests, benchmarks).

k-diffusion (Crowson) holds the de facto reference code of the EDM-style samplers, but its
package ``__init__`` imports its training and evaluation stack (CLIP, kornia, wandb, ...).
:func:`kdiffusion_sampling` loads its ``sampling.py`` alone: the one helper it takes from
``k_diffusion.utils`` (``append_dims``) is given, and the two modules it imports for solvers
that need them (``torchdiffeq`` for ``log_likelihood``, ``torchsde`` for Brownian-tree noise)
are stubbed while it loads, unless they are installed. Pass ``noise_sampler`` to the SDE
samplers so they never reach the stub. Nothing in fundiff imports this at run time.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Optional


def kdiffusion_sampling() -> Optional[types.ModuleType]:
    """k-diffusion's ``sampling`` module loaded on its own, or None when it is not installed
    (``pip install --no-deps k-diffusion`` is enough)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    if not path.is_file():
        return None
    package = types.ModuleType("_kdiffusion_reference")
    package.__path__ = []  # a namespace holding the one submodule loaded here
    utils = types.ModuleType("_kdiffusion_reference.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    modules = {"_kdiffusion_reference": package, "_kdiffusion_reference.utils": utils}
    for optional in ("torchdiffeq", "torchsde"):
        if importlib.util.find_spec(optional) is None:
            stub = types.ModuleType(optional)
            stub.odeint = None
            modules[optional] = stub
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        module_spec = importlib.util.spec_from_file_location("_kdiffusion_reference.sampling", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module
