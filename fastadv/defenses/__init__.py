"""Defenses that are not a training loss on their own: input-side procedures and the training methods that go with them.

=================  ==============================================================
robustify          preemptive robustification of images before sending them
                   (Moon, An & Song, AAAI 2022): a nearby x' whose eps-ball is robust
PreemptiveAT       the paper's preemptively robust training (a ``Method``, "preemptive")
IWDAT              adversarial training on internal-Wasserstein adversarial examples
                   (Li et al. 2021, arXiv 2103.07598; a ``Method``, "iwd")
=================  ==============================================================

The two training methods live in ``fastadv.train.methods.robustify`` (a
``Method`` subclass must be defined inside the training package, which
imports its methods eagerly) and are re-exported here lazily, so
``import fastadv.defenses`` does not load the training loop.
"""
from fastadv.defenses.preemptive import RobustifyResult, exact_linf, robustify

__all__ = ["robustify", "RobustifyResult", "exact_linf", "PreemptiveAT", "IWDAT"]


def __getattr__(name):
    if name in ("PreemptiveAT", "IWDAT"):
        from fastadv.train.methods import robustify as _m

        return getattr(_m, name)
    raise AttributeError(f"module 'fastadv.defenses' has no attribute {name!r}")
