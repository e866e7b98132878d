"""Triton kernels for fastadv, installed as ``fastadv.kernels``.

Import these through ``fastadv`` (its dispatcher registers them as
``fastadv::triton_*`` ops). On a machine without a GPU they run under the
Triton interpreter when ``TRITON_INTERPRET=1`` is set before import.
"""
