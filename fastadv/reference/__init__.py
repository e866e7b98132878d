"""Pure-PyTorch twins of every fused op: the ground truth for tests and benchmarks."""
from fastadv.reference.lp import (  # noqa: F401
    l1_direction,
    l1_step,
    l2_step,
    linf_step,
    project_l1,
    project_l2,
    project_linf,
)
