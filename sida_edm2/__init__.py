"""SiDA distillation of EDM2 latent diffusion models.

Subpackages: model (networks, layers, presets, speed switches), train (the trainer and its DeepSpeed
plumbing), io (network import/export), sample (sampling, image files, metrics), plan (memory and FLOPs).

The documented module names from before the subpackages keep working as aliases of their new homes:
`from sida_edm2.presets import PRESETS`, `from sida_edm2.networks import Precond`,
`from sida_edm2.checkpoints import load_network`, `python -m sida_edm2.checkpoints convert SRC DST`,
`python -m sida_edm2.flops` and `python -m sida_edm2.metrics`. An alias is the same module object as its
target (imported lazily, on first use), not a copy, so there is no second file to keep in step.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys
from types import CodeType, ModuleType

PUBLIC_ALIASES = {
    "sida_edm2.checkpoints": "sida_edm2.io.network_files",
    "sida_edm2.flops": "sida_edm2.plan.flops",
    "sida_edm2.metrics": "sida_edm2.sample.metrics",
    "sida_edm2.networks": "sida_edm2.model.networks",
    "sida_edm2.presets": "sida_edm2.model.presets",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves each PUBLIC_ALIASES name to its target module (for `import` and for `python -m`)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name not in PUBLIC_ALIASES:
            return None
        # `python -m ALIAS` puts the origin in sys.argv[0], from which the CLIs' usage line names the
        # command: the alias's own name (sida_edm2/checkpoints.py), although no file is there.
        origin = os.path.join(os.path.dirname(__file__), name.rpartition(".")[2] + ".py")
        return importlib.util.spec_from_loader(name, self, origin=origin)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(PUBLIC_ALIASES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the target executed under its own name in create_module."""

    def get_code(self, name: str) -> CodeType | None:
        """`python -m ALIAS` runs the target's code as __main__ (runpy asks the loader for it)."""
        target = PUBLIC_ALIASES[name]
        return importlib.util.find_spec(target).loader.get_code(target)


# First in line: an installed copy of the package (an editable install's finder) must not answer first.
if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
