"""``fastadv eval``: a fastadv checkpoint is all it needs, it refuses to run without one, exit codes, and
``torchrun`` sharding (2 gloo processes give exactly the single-process result)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

from fastadv.models import get_model
from fastadv.train.checkpoint import save_model_file

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    net = get_model("mnist_cnn", 10, width=0.125)
    meta = {"name": "mnist_cnn", "num_classes": 10, "kwargs": {"width": 0.125}, "normalize": None,
            "dataset": "embedded-mnist", "input_shape": [1, 28, 28]}
    return save_model_file(tmp_path / "model.pt", net, meta)


def test_checkpoint_is_all_it_needs(checkpoint, tmp_path, capsys):
    from fastadv.cli import main

    rc = main(["eval", "--checkpoint", str(checkpoint), "--eps", "0.3", "--version", "fast", "--n", "16",
               "--batch-size", "8", "--no-checks", "--no-progress", "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fast evaluation" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n"] == 16 and list(report["attacks"]) == ["apgd-ce", "apgd-t"]
    assert (tmp_path / "out" / "report.md").exists()


def test_refusals(checkpoint, tmp_path):
    from fastadv.cli import main

    with pytest.raises(SystemExit) as exc:  # no --checkpoint: argparse refuses (exit 2), no random-model report
        main(["eval", "--eps", "0.1"])
    assert exc.value.code == 2
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--eps", "0.1"]) == 2
    bare = tmp_path / "bare.pt"
    torch.save(get_model("mnist_cnn", 10, width=0.125).state_dict(), bare)
    assert main(["eval", "--checkpoint", str(bare), "--eps", "0.1"]) == 2  # no recorded architecture, no --model
    assert main(["eval", "--checkpoint", str(checkpoint), "--eps", "0.1", "--model-kwargs", '{"width": 0.5}']) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_sharded_eval_equals_one_process(checkpoint, tmp_path):
    common = ["eval", "--checkpoint", str(checkpoint), "--eps", "0.2", "--version", "fast", "--n-samples", "48",
              "--batch-size", "8", "--no-checks", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    one = subprocess.run([sys.executable, "-m", "fastadv.cli", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                          f"--master_port={_free_port()}", "-m", "fastadv.cli", *common, "--out",
                          str(tmp_path / "two"), "--resume", str(tmp_path / "state.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    # every batch draws from its own seed, so the sharded run is the same run, per sample
    for k in ("n", "clean_accuracy", "robust_accuracy", "per_class"):
        assert a[k] == b[k], k
    for nm in a["attacks"]:
        assert a["attacks"][nm]["fooled"] == b["attacks"][nm]["fooled"]
    # one resume state per rank, each holding its own shard of the 6 batches
    shards = [json.loads((tmp_path / f"state.json.rank{r}").read_text())["batches"] for r in (0, 1)]
    assert sorted(shards[0]) == ["0", "2", "4"] and sorted(shards[1]) == ["1", "3", "5"]


def test_ensemble_checkpoint_is_rebuilt_as_an_ensemble(tmp_path):
    # fastadv train --ensemble-size / --members records {"ensemble": {"size", "combine"}}; eval rebuilds the
    # Ensemble and loads every member's weights (a single model would not fit the members.{i}. keys)
    import argparse

    from fastadv.evaluate_cli import build_model
    from fastadv.models import Ensemble

    torch.manual_seed(0)
    ens = Ensemble([get_model("mnist_cnn", 10, width=0.125) for _ in range(3)])
    meta = {"name": "mnist_cnn", "num_classes": 10, "kwargs": {"width": 0.125}, "normalize": None,
            "dataset": "embedded-mnist", "input_shape": [1, 28, 28], "ensemble": {"size": 3, "combine": "logits"}}
    path = save_model_file(tmp_path / "model.pt", ens, meta)
    args = argparse.Namespace(checkpoint=str(path), model=None, model_kwargs=None, normalize=None, num_classes=None)
    model, _ = build_model(args)
    assert isinstance(model, Ensemble) and len(model.members) == 3
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ens.eval()(x))
