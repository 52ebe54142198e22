"""tf_psp: Parameterized Structured Pruning (PSP) for Keras 3.

Train one scale `alpha` per structure with weight decay, then physically
remove the structures whose alpha reached zero.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from tf_psp import quiet

quiet.quiet_environment()  # before anything here loads TensorFlow

# Public name -> the submodule that defines it. Submodules are imported on first
# use (PEP 562), so `import tf_psp` and `tf-psp --help` do not load Keras.
_NAMES = {
    "balance_alphas": "balance",
    "RecalibrateBatchNorm": "batchnorm",
    "fold_batchnorm": "batchnorm",
    "recalibrate_batchnorm": "batchnorm",
    "BudgetReport": "budget",
    "prune_to_budget": "budget",
    "PruneToBudget": "callbacks",
    "PSPMonitor": "callbacks",
    "parameterize": "convert",
    "Distiller": "distill",
    "PSPGroupAlphas": "group_alphas",
    "LatencyTable": "latency",
    "latency_table": "latency",
    "PSPConv1D": "layers",
    "PSPConv2D": "layers",
    "PSPConv2DTranspose": "layers",
    "PSPConv3D": "layers",
    "PSPDense": "layers",
    "PSPDepthwiseConv2D": "layers",
    "PSPSeparableConv2D": "layers",
    "is_psp_layer": "layers",
    "PruneReport": "pipeline",
    "prune": "pipeline",
    "PruningPlan": "plan",
    "Unit": "plan",
    "pruning_plan": "plan",
    "LayerProfile": "profiling",
    "ModelProfile": "profiling",
    "Removability": "profiling",
    "profile": "profiling",
    "removability": "profiling",
    "register_layer": "registry",
    "unregister_layer": "registry",
    "strip": "shrink",
    "strip_and_shrink": "shrink",
}

# The modules that register tf_psp classes with Keras's serialization, so that
# `keras.models.load_model` finds them after `import tf_psp`.
_SERIALIZABLE_MODULES = ("layers", "group_alphas", "regularizers", "attention", "recurrent")


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    _register_serializables()
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_NAMES))


_registered = []


def _register_serializables(finished=None):
    """Imports the modules that register classes with Keras, once Keras is loaded.

    Waits while Keras, TensorFlow or a tf_psp module is half-imported (a tf_psp
    module's `import keras` may have loaded Keras; importing more modules then
    could see it incomplete): the import hook below calls again when each of
    them has run (`finished`, its name), so the outermost one registers.
    """
    if _registered or "keras" not in sys.modules:
        return
    for name, module in list(sys.modules.items()):
        watched = name in ("keras", "tensorflow") or name.startswith(f"{__name__}.")
        if watched and name != finished and getattr(
                getattr(module, "__spec__", None), "_initializing", False):
            return
    _registered.append(True)
    for module in _SERIALIZABLE_MODULES:
        importlib.import_module(f"{__name__}.{module}")


class _ImportHook(importlib.abc.MetaPathFinder):
    """Quiets the first `import tensorflow`/`import keras`; registers the layers after.

    TensorFlow prints a oneDNN banner at import that ignores
    `TF_CPP_MIN_LOG_LEVEL`: that import runs inside
    `quiet.native_stderr_filtered()`. `import tf_psp` does not load Keras
    (seconds), yet a saved PSP model must load with `keras.models.load_model`
    after `import tf_psp`, or after `import tf_psp.compat` alone: each import
    of Keras or of a tf_psp module ends with `_register_serializables`. The
    hook removes itself once the layers are registered.
    """

    def __init__(self):
        self._quiet_pending = {"tensorflow", "keras"}
        self._resolving = set()

    def find_spec(self, fullname, path=None, target=None):
        quiet_import = fullname in self._quiet_pending
        ours = fullname.startswith(f"{__name__}.")
        if not (quiet_import or ours) or fullname in self._resolving:
            return None
        self._quiet_pending.discard(fullname)
        self._resolving.add(fullname)  # find the real spec, without us
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._resolving.discard(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_register(module):
            if quiet_import:
                with quiet.native_stderr_filtered():
                    exec_module(module)
            else:
                exec_module(module)
            _register_serializables(finished=fullname)
            if _registered and not self._quiet_pending and self in sys.meta_path:
                sys.meta_path.remove(self)

        loader.exec_module = exec_and_register
        return spec


if "keras" in sys.modules:
    _register_serializables()
else:
    sys.meta_path.insert(0, _ImportHook())

__version__ = "0.1.0"  # setup.py and `tf-psp --version` read it from here

__all__ = [
    "PSPConv1D",
    "PSPConv2D",
    "PSPConv3D",
    "PSPConv2DTranspose",
    "PSPDense",
    "PSPGroupAlphas",
    "PSPDepthwiseConv2D",
    "PSPSeparableConv2D",
    "PSPMonitor",
    "PruneReport",
    "PruneToBudget",
    "PruningPlan",
    "BudgetReport",
    "Unit",
    "LatencyTable",
    "latency",
    "latency_table",
    "budget",
    "pipeline",
    "plan",
    "prune",
    "register_layer",
    "unregister_layer",
    "handlers",
    "prune_to_budget",
    "pruning_plan",
    "sparse_training",
    "RecalibrateBatchNorm",
    "LayerProfile",
    "ModelProfile",
    "Removability",
    "balance",
    "balance_alphas",
    "batchnorm",
    "bench",
    "callbacks",
    "fold_batchnorm",
    "coupling",
    "distill",
    "Distiller",
    "export",
    "is_psp_layer",
    "parameterize",
    "profile",
    "recalibrate_batchnorm",
    "regularizers",
    "removability",
    "strip",
    "strip_and_shrink",
    "structures",
]
