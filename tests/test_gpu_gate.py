"""A backend that has never passed on a real GPU is never the automatic choice there (tested on CPU: the
choice logic takes the device type as a string)."""
import json

import pytest
import torch

import fastadv
from fastadv import _dispatch


@pytest.fixture
def verified(monkeypatch):
    def set_(record):
        monkeypatch.setattr(_dispatch, "_VERIFIED", {b: set(v) for b, v in record.items()})
        monkeypatch.delenv("FASTADV_GPU_UNVERIFIED", raising=False)
    return set_


def test_unverified_backends_are_not_chosen_on_cuda(verified, monkeypatch):
    verified({})
    for op in ("linf_step", "project_l1", "sinkhorn"):
        for b in ("triton", "cuda"):
            assert not _dispatch._gpu_gate(op, b, "cuda")
        assert _dispatch._gpu_gate(op, "ref", "cuda") and _dispatch._gpu_gate(op, "cpp", "cpu")
    verified({"triton": ["linf_step"]})
    assert _dispatch._gpu_gate("linf_step", "triton", "cuda")
    assert not _dispatch._gpu_gate("l2_step", "triton", "cuda") and not _dispatch._gpu_gate("linf_step", "cuda", "cuda")
    monkeypatch.setenv("FASTADV_GPU_UNVERIFIED", "1")  # the validation run itself
    assert _dispatch._gpu_gate("l2_step", "cuda", "cuda")


def test_cuda_preference_is_triton_first_for_every_op():
    assert _dispatch._DEFAULT_ORDER["cuda"][0] == "triton"
    assert "project_l1" not in _dispatch._ORDER or _dispatch._ORDER["project_l1"].get("cuda", ("triton",))[0] == "triton"


def test_backends_report_unverified(verified):
    verified({})
    info = fastadv.backends()
    for b in ("triton", "cuda"):
        assert any("unverified on GPU" in n for n in info[b]["notes"])
    verified({"triton": ["linf_step", "l2_step"]})
    assert any("verified on GPU for: l2_step, linf_step" in n for n in fastadv.backends()["triton"]["notes"])


def test_shipped_record_is_valid_json():
    import pathlib

    data = json.loads((pathlib.Path(_dispatch.__file__).with_name("gpu_verified.json")).read_text())
    assert isinstance(data["backends"], dict)
    for b, rec in data["backends"].items():  # every entry says where and from which commit it passed
        assert b in ("triton", "cuda") and rec["ops"] and rec["device"] and rec["commit"]
