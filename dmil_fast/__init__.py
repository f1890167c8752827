"""dmil_fast: fast, drop-in DMIL with fused kernels and per-sample interaction estimation.

    import dmil_fast as dm
    dm.ops.gaussian_sample(mu, logvar)
    dm.DMILModel(video_model, audio_model, embed_size=512, num_class=6, method=None, stage=1)
"""

import importlib as _importlib

import torch as _torch  # noqa: F401  (the C++ extension needs torch's libraries loaded first)

from . import ops
from .compat import diagonal_gaussian_kl  # the official function's signature and conversions

__version__ = "0.1.0"

# Submodules that pull in more (models, training, plotting) load on first attribute access.
_LAZY_ATTRS = {
    "VariationalBottleneck": ("dmil_fast.nn", "VariationalBottleneck"),
    "DMILModel": ("dmil_fast.nn", "DMILModel"),
}
_LAZY_MODULES = ("nn", "interactions", "data", "train", "reference", "info")


def __getattr__(name):
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        return getattr(_importlib.import_module(module), attr)
    if name in _LAZY_MODULES:
        return _importlib.import_module(f"dmil_fast.{name}")
    raise AttributeError(f"module 'dmil_fast' has no attribute {name!r}")


__all__ = ["ops", "diagonal_gaussian_kl", "VariationalBottleneck", "DMILModel", "__version__"]
