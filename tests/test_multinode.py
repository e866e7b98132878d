"""Several nodes, simulated on one machine: two ``torchrun`` agents (``--nnodes 2 --nproc_per_node 1``, a c10d
rendezvous on 127.0.0.1), so every process has LOCAL_RANK 0 and the global RANK comes from the rendezvous, as on
a real cluster (gloo, CPU).

* With one shared output folder the two nodes train exactly what one process trains on the same global batch, up
  to float32 summation order.
* With a folder per node (no shared filesystem) a resume is refused with a message that says why, instead of rank
  0 resuming while the other rank starts from scratch; the checkpoint is on global rank 0's node only.
"""
import os
import pathlib
import subprocess
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_train_loop import _SMALL, _assert_equal_to_rounding, _free_port  # noqa: E402


def _two_nodes(outs, extra=()):
    """Both agents at once, node i writing to outs[i]; returns [(returncode, stderr)] per node. Output goes to
    files, so neither agent can block on a full pipe while the other waits for it in a collective."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    port = _free_port()
    logs = [pathlib.Path(str(out) + f".node{i}.log") for i, out in enumerate(outs)]
    procs = []
    for out, log in zip(outs, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                 "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=fastadv-test", "-m",
                 "fastadv.cli", "train", *_SMALL, "--method", "standard", *extra, "--out", str(out)],
                env=env, stdout=subprocess.DEVNULL, stderr=f, text=True))
    return [(p.wait(timeout=600), log.read_text()) for p, log in zip(procs, logs)]


def test_two_nodes_train_as_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    one = subprocess.run([sys.executable, "-m", "fastadv.cli", "train", *_SMALL, "--method", "standard",
                          "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    shared = tmp_path / "shared"
    runs = _two_nodes([shared, shared])
    for rc, err in runs:
        assert rc == 0, err[-3000:]
    assert any("world size 2" in err for _, err in runs)
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["model"]
    b = torch.load(shared / "model.pt", weights_only=True)["model"]
    _assert_equal_to_rounding(a, b)


def test_resume_without_a_shared_folder_is_refused(tmp_path):
    outs = [tmp_path / "node0", tmp_path / "node1"]
    first = _two_nodes(outs, ["--max-steps", "2", "--epochs", "2"])
    for rc, err in first:
        assert rc == 0, err[-3000:]
    written = [o for o in outs if (o / "last.pt").exists()]
    assert len(written) == 1  # global rank 0's node only
    again = _two_nodes(outs, ["--max-steps", "2", "--epochs", "2", "--resume"])
    for rc, err in again:
        assert rc != 0
        assert "every node shares" in err, err[-3000:]
