"""Proof at small scale: a generated JPEG folder trained for two epochs with progressive resizing (and a batch
size per phase) under ``torchrun --nproc_per_node 2`` (gloo, CPU), killed mid-epoch with SIGTERM (to the whole
process group, as Slurm does) or SIGKILL, resumed, ends with the same weights, bit for bit, as an uninterrupted
2-process run; the ranks read disjoint shards.

This file is also the training script torchrun launches (``python -m torch.distributed.run ... this_file``).
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEDULE = "0:24@16,1:32@8"  # epoch 1: 24 px, global batch 16 (6 steps); epoch 2: 32 px, batch 8 (12 steps)
PAUSE_AT = 9  # the 3rd batch of epoch 2: mid-epoch, in the second phase
SAVE_EVERY = 2  # SIGKILL resumes from the checkpoint at epoch 2, batch 2


def _net():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def worker(data, out, resume, pause_at):
    """Runs in each torchrun rank: FGSM-RS (per-rank random starts) on the folder; pauses after step
    ``pause_at`` (writing <out>/paused-<rank>) until SIGTERM, so the test can signal it mid-epoch."""
    from fastadv.data.imagefolder import ImageFolder
    from fastadv.train import TrainConfig, Trainer, methods as M
    from fastadv.train import distributed as D

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", lr=0.05, schedule="cyclic", out_dir=out,
                      resume=resume, progress=False, save_every=SAVE_EVERY, workers=2, prefetch=2, device="cpu",
                      resize_schedule=SCHEDULE, plot=False, log_every=1, seed=0)

    def pause(trainer, record):
        if record["step"] != pause_at:
            return
        pathlib.Path(out, f"paused-{trainer.dist.rank}").write_text(str(os.getpid()))
        handler = signal.getsignal(signal.SIGTERM)  # the trainer's SIGTERM flag (fastadv.train.trainer._Sigterm)
        while not getattr(getattr(handler, "__self__", None), "flag", False):
            time.sleep(0.05)

    tr = Trainer(_net(), M.FastAT(eps=0.05), ImageFolder(data, train=True, size=40, seed=0), None, cfg,
                 callbacks=[pause] if pause_at else [])
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    if not resume:  # this rank's shard of every epoch, for the test
        shards = {e: [b.tolist() for b in tr._index_batches(e)] for e in range(cfg.epochs)}
        pathlib.Path(out, f"shards-{tr.dist.rank}.json").write_text(json.dumps(shards))
    res = tr.fit()
    D.cleanup()
    print(json.dumps({"rank": tr.dist.rank, "stopped": res["stopped"], "step": res["step"],
                      "builds": tr.train_data.loader.builds}))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data, out, *, resume=False, pause_at=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", __file__, str(data), str(out), "1" if resume else "0", str(pause_at)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_paused(out, proc, timeout=120):
    t0 = time.time()
    while not all((out / f"paused-{r}").exists() for r in (0, 1)):
        if proc.poll() is not None:
            raise AssertionError(f"exited before pausing: {proc.communicate()[1][-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("never paused")
        time.sleep(0.1)
    return [int((out / f"paused-{r}").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_imagefolder_path import make_folder

    return make_folder(tmp_path_factory.mktemp("dist") / "train", per_class=32, classes=3, seed=2)  # 96 images


def _same_weights(a, b):
    wa = torch.load(a / "model.pt", weights_only=True)["model"]
    wb = torch.load(b / "model.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, differ


def _ckpt(out):
    ck = torch.load(out / "last.pt", weights_only=True)
    return ck["epoch"], ck["batch_in_epoch"], ck["step"]


@pytest.fixture(scope="module")
def runs(folder):
    """All five torchrun launches, in two concurrent waves (each launch costs ~20 s of process start-up and
    imports on this 2-core machine, the training itself ~1 s): the uninterrupted reference and the two runs to
    be interrupted; then the two resumes."""
    root = folder.parent
    ref = _launch(folder, root / "ref")
    term = _launch(folder, root / "term", pause_at=PAUSE_AT)
    kill = _launch(folder, root / "kill", pause_at=PAUSE_AT)
    try:
        _wait_paused(root / "term", term)
        # SIGTERM to the agent's process group; torchrun passes it on to each rank's process group (trainer
        # and decoding workers: those ignore it, the trainer stops after the step and checkpoints)
        os.killpg(term.pid, signal.SIGTERM)
        pids = _wait_paused(root / "kill", kill)
        # a node failure: every process dies at once. torchrun starts each rank in its own session (process
        # group, with its decoding workers), so kill those groups and the agent's.
        for pid in pids:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        os.killpg(kill.pid, signal.SIGKILL)
        kill.communicate(timeout=60)
        out = {"term_stop": _finish(term), "kill_ckpt": _ckpt(root / "kill")}
        out["term_ckpt"] = _ckpt(root / "term")
        out["term_had_model"] = (root / "term" / "model.pt").exists()
        term2 = _launch(folder, root / "term", resume=True)
        kill2 = _launch(folder, root / "kill", resume=True)
        out["ref"], out["term_resume"], out["kill_resume"] = _finish(ref), _finish(term2), _finish(kill2)
    finally:
        for p in (ref, term, kill):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out["root"] = root
    return out


def test_reference_run_shards_resizes_and_builds_one_loader(runs):
    rc, so, se = runs["ref"]
    assert rc == 0, se[-3000:]
    reference = runs["root"] / "ref"
    assert [json.loads(s)["builds"] for s in so.strip().splitlines()] == [1, 1]  # one DataLoader per rank, per run
    s0 = json.loads((reference / "shards-0.json").read_text())
    s1 = json.loads((reference / "shards-1.json").read_text())
    assert [len(s0["0"]), len(s0["1"])] == [6, 12] and len(s0["0"][0]) == 8 and len(s0["1"][0]) == 4
    for e in ("0", "1"):
        a = [i for b in s0[e] for i in b]
        b = [i for b in s1[e] for i in b]
        assert not set(a) & set(b) and len(set(a) | set(b)) == 96  # disjoint shards covering the epoch
    epochs = [json.loads(s) for s in (reference / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert [(r["image_size"], r["batch_size"]) for r in epochs] == [(24, 16), (32, 8)]
    assert all(r["data_wait_s"] >= 0 for r in epochs)


def test_sigterm_to_the_process_group_mid_epoch_then_resume_gives_the_same_weights(runs):
    rc, so, se = runs["term_stop"]
    assert "stopped (SIGTERM) at epoch 2, batch 3" in se, se[-3000:]
    assert runs["term_ckpt"] == (1, 3, PAUSE_AT) and not runs["term_had_model"]
    rc, so, se = runs["term_resume"]
    assert rc == 0, se[-3000:]
    assert "resumed from" in se and "epoch 1, batch 3" in se
    _same_weights(runs["root"] / "term", runs["root"] / "ref")


def test_sigkill_mid_epoch_resumes_from_the_last_save_every_checkpoint(runs):
    # the checkpoint written every SAVE_EVERY batches: epoch 2, batch 2 (step 9 died with the processes)
    assert runs["kill_ckpt"] == (1, 2, 8)
    rc, so, se = runs["kill_resume"]
    assert rc == 0, se[-3000:]
    assert "resumed from" in se and "epoch 1, batch 2" in se
    _same_weights(runs["root"] / "kill", runs["root"] / "ref")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]))
