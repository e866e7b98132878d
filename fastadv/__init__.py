"""fastadv: fused kernels, attacks and training for adversarial robustness in PyTorch.

``import fastadv`` never initialises CUDA and never fails because the compiled
extension is missing; ``fastadv.backends()`` reports what this install can run.
"""
from fastadv import ops  # noqa: F401
from fastadv._dispatch import BackendUnavailable, backends, use_backend  # noqa: F401
from fastadv._validate import validation  # noqa: F401
from fastadv.evaluation import evaluate  # noqa: F401,E402  (the implementation is the package fastadv.evaluation)

__version__ = "0.1.0"
__all__ = ["ops", "backends", "use_backend", "validation", "evaluate", "BackendUnavailable", "__version__"]
