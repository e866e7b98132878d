"""The JPEG-folder data path (fastadv.data.loader): one persistent loader, the same images in the same order with
the same augmentation across a mid-epoch resume whatever worker decodes them, disjoint shards per rank,
unreadable images skipped (counted, with their path) or fatal (naming the path), progressive resizing,
a lazily decoded held-out set, the piecewise lr schedule, recipes and --dry-run."""
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastadv.data import DatasetError
from fastadv.data.imagefolder import ImageFolder
from fastadv.data.loader import (BadImageError, EpochLoader, HeldoutImages, Phase, parse_schedule, phase_at)
from fastadv.train import distributed as D
from fastadv.train.trainer import TensorData, TrainConfig, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def make_folder(root, per_class=8, classes=3, seed=0, lo=24, hi=40):
    """root/class<c>/img<k>.JPEG, sides drawn in [lo, hi], the class's channel brightened (learnable)."""
    rng = np.random.default_rng(seed)
    root = pathlib.Path(root)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            a[..., c] = np.clip(a[..., c].astype(int) + 80, 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"class{c}" / f"img{k:03d}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("jpegs"))


class NoisyFolder(torch.utils.data.Dataset):
    """A dataset whose transform draws from torch's GLOBAL generator (as torchvision transforms do)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.01 * torch.rand(()), y


def _epoch(loader, n, epoch, rank=0, world=1, batch=6, start=0, size=None, seed=3):
    order = D.global_permutation(n, seed, epoch)
    batches = D.shard_indices(order, batch, rank, world)
    return [(x.clone(), y.clone()) for x, y in loader.batches(batches[start:], "cpu", epoch, seed, size=size,
                                                               rank=rank, start=start)], batches


def test_one_persistent_loader_and_resume_sees_the_same_batches(folder):
    ds = ImageFolder(folder, train=True, size=20, seed=5)
    n = len(ds)
    full = EpochLoader(ds, workers=2, prefetch=3)
    e0, _ = _epoch(full, n, 0)
    pids0 = [w.pid for w in full._loader._iterator._workers]
    e1, batches = _epoch(full, n, 1)
    assert full.builds == 1 and full._loader.prefetch_factor == 3 and full._loader.persistent_workers
    assert [w.pid for w in full._loader._iterator._workers] == pids0  # the same decoding processes, epoch 2
    assert not torch.equal(e0[0][0], e1[0][0])  # a new epoch: new order and augmentation
    # a resume that skips 3 batches (so every later batch goes to another worker) gets the same pixels
    resumed = EpochLoader(ds, workers=2)
    tail, _ = _epoch(resumed, n, 1, start=3)
    assert len(tail) == len(e1) - 3
    for (xa, ya), (xb, yb) in zip(e1[3:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # in-process decoding gives the same batches as worker processes
    inproc, _ = _epoch(EpochLoader(ds, workers=0), n, 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e1, inproc))
    # the labels are those of the planned indices, in order
    assert torch.equal(torch.cat([y for _, y in e1]), torch.tensor([ds.targets[i] for b in batches for i in b]))


def test_global_generator_transforms_are_reproducible_across_a_resume(folder):
    ds = NoisyFolder(ImageFolder(folder, train=False, size=16))
    full, _ = _epoch(EpochLoader(ds, workers=2), len(ds), 0)
    tail, _ = _epoch(EpochLoader(ds, workers=1), len(ds), 0, start=2)
    for (xa, _), (xb, _) in zip(full[2:], tail):
        assert torch.equal(xa, xb)  # the worker's generators were seeded per (seed, epoch, rank, batch position)


def test_ranks_read_disjoint_shards_in_their_own_order(folder):
    ds = ImageFolder(folder, train=True, size=16, seed=0)
    loader = EpochLoader(ds, workers=0)
    r0, b0 = _epoch(loader, len(ds), 0, rank=0, world=2)
    r1, b1 = _epoch(loader, len(ds), 0, rank=1, world=2)
    i0, i1 = torch.cat(b0), torch.cat(b1)
    assert not set(i0.tolist()) & set(i1.tolist()) and len(i0) == len(i1) == 12
    assert not torch.equal(r0[0][0], r1[0][0])
    # the two shards of a global batch are exactly one process's global batch
    one, g = _epoch(loader, len(ds), 0, world=1)
    assert torch.equal(torch.cat([b0[0], b1[0]]), g[0])


def test_progressive_resizing_keys_carry_the_size(folder):
    ds = ImageFolder(folder, train=True, size=32, seed=0)
    loader = EpochLoader(ds, workers=2)
    a, _ = _epoch(loader, len(ds), 0, size=16)
    b, _ = _epoch(loader, len(ds), 1, size=28)  # the same persistent workers, a new size
    assert a[0][0].shape[-1] == 16 and b[0][0].shape[-1] == 28 and loader.builds == 1
    with pytest.raises(ValueError, match="cannot be resized"):
        _epoch(EpochLoader(NoisyFolder(ds)), len(ds), 0, size=16)
    assert parse_schedule("0:128@512, 6:224@224,12:288") == [Phase(0, 128, 512), Phase(6, 224, 224),
                                                            Phase(12, 288, None)]
    assert parse_schedule("0:@64") == [Phase(0, None, 64)] and parse_schedule(None) == []
    assert phase_at(parse_schedule("0:16,3:24"), 2).size == 16 and phase_at(parse_schedule("0:16,3:24"), 3).size == 24
    for bad, msg in (("1:128", "start at epoch 0"), ("0:128,0:224", "increase"), ("0-128", "EPOCH:SIZE"),
                     ("0:0", ">= 1"), ("0:", "EPOCH:SIZE")):
        with pytest.raises(ValueError, match=msg):
            parse_schedule(bad)


def _corrupt(folder, tmp_path):
    root = make_folder(tmp_path / "data", per_class=4, classes=2, seed=1)
    trunc = root / "class0" / "img001.JPEG"
    trunc.write_bytes(trunc.read_bytes()[:60])  # a truncated JPEG: PIL opens it, decoding fails
    (root / "class1" / "img002.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return root, [str(trunc), str(root / "class1" / "img002.JPEG")]


def test_bad_images_are_skipped_with_their_path_or_fail_naming_it(folder, tmp_path, capfd):
    root, bad = _corrupt(folder, tmp_path)
    ds = ImageFolder(root, train=True, size=16, seed=0)
    skip = EpochLoader(ds, workers=2, on_bad_image="skip")
    batches = [torch.arange(len(ds))]
    (x, y), = list(skip.batches(batches, "cpu", 0, 0))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,)  # the batch keeps its shape
    assert sorted(p for _, p, _ in skip.bad) == sorted(bad)
    err = capfd.readouterr().err
    assert all(f"skipped unreadable image {p}" in err for p in bad)
    # the replacement is the next readable sample, augmented with the skipped sample's own stream
    i = [k for k, (p, _) in enumerate(ds.samples) if p == bad[0]][0]
    assert torch.equal(x[i], ds.load(i + 1, 0, 16, key=i)[0]) and int(y[i]) == ds.targets[i + 1]
    assert not torch.equal(x[i], x[i + 1])
    fail = EpochLoader(ds, workers=2, on_bad_image="fail")
    with pytest.raises(BadImageError, match=r"img001\.JPEG: unreadable image"):
        list(fail.batches(batches, "cpu", 0, 0))
    with pytest.raises(ValueError, match="on_bad_image"):
        EpochLoader(ds, on_bad_image="ignore")


def test_trainer_counts_skipped_images_in_the_epoch_record(tmp_path):
    from fastadv.train import Trainer, methods as M

    root, bad = _corrupt(None, tmp_path)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2))
    cfg = TrainConfig(epochs=1, batch_size=4, out_dir=str(tmp_path / "run"), progress=False, workers=1,
                      on_bad_image="skip", resize_schedule="0:12@4", plot=False, schedule="constant", lr=0.01)
    res = Trainer(net, M.Standard(), ImageFolder(root, train=True, size=32), None, cfg).fit()
    rec = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["bad_images"] == 2 and sorted(rec["bad_image_paths"]) == sorted(bad)
    assert rec["image_size"] == 12 and rec["data_wait_s"] >= 0 and rec["bound"] in ("data", "model")
    assert res["bad_images"] == 2
    cfg_fail = TrainConfig(epochs=1, batch_size=4, progress=False, workers=0, schedule="constant", lr=0.01)
    with pytest.raises(DatasetError, match="unreadable image"):
        Trainer(net, M.Standard(), ImageFolder(root, train=True, size=12), None, cfg_fail).fit()


def test_heldout_is_decoded_lazily_at_the_eval_size(folder):
    val = ImageFolder(folder, train=False, size=20)
    held = HeldoutImages(val, 10, workers=2)
    assert not held.decoded
    x, y = held
    assert held.decoded and x.shape == (10, 3, 20, 20) and y.dtype == torch.int64
    ref = torch.stack([val[i][0] for i in held.indices])
    assert torch.equal(x, ref) and torch.equal(held[1], torch.tensor([val.targets[i] for i in held.indices]))


def test_heldout_shard_decodes_only_its_share_and_evaluates_as_the_slice(folder, monkeypatch):
    # under torchrun each rank decodes 1/world of the held-out images (the split evaluate_accuracy uses)
    from fastadv.train import distributed as D
    from fastadv.train.trainer import evaluate_accuracy

    val = ImageFolder(folder, train=False, size=16)
    held = HeldoutImages(val, 10, workers=0)
    seen = []
    get = type(val).__getitem__
    monkeypatch.setattr(type(val), "__getitem__", lambda self, i: seen.append(i) or get(self, i))
    xs, ys = held.shard(7, 1, 2)  # 7 images over 2 ranks: rank 1 holds images 4, 5, 6
    assert not held.decoded and seen == held.indices[4:7] and xs.shape == (3, 3, 16, 16)
    x, y = held
    assert torch.equal(xs, x[4:7]) and torch.equal(ys, y[4:7])
    assert held.shard(7, 1, 2)[0].shape[0] == 3 and held.shard(2, 3, 4)[0].shape[0] == 0
    # the presharded call gives rank 1's numbers of the slicing call on the whole set
    monkeypatch.setattr(D, "info", lambda: D.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(D, "all_reduce_sum", lambda t: t)  # one process plays rank 1: nothing to reduce
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, len(val.classes)))
    kw = dict(eps=0.03, steps=2, batch_size=2, device="cpu", seed=5)
    whole = evaluate_accuracy(net, x[:7], y[:7], **kw)
    part = evaluate_accuracy(net, xs, ys, presharded=True, **kw)
    assert whole == part and whole["n"] == 3


def test_torchrun_heldout_check_runs_on_rank_shards(tmp_path):
    # `fastadv train --dataset imagefolder` on 2 gloo ranks: the per-epoch check decodes each rank's share of
    # the 7 held-out images (rank 0 images 0-3, rank 1 images 4-6) and reports all 7; then the final evaluation
    # runs sharded on both ranks (measured 64 s in all, 10 s without the final evaluation)
    import os
    import socket
    import subprocess
    import sys

    make_folder(tmp_path / "data" / "train", per_class=8)
    make_folder(tmp_path / "data" / "val", per_class=3, seed=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                        f"--master_port={port}", "-m", "fastadv.cli", "train", "--dataset", "imagefolder",
                        "--data-dir", str(tmp_path / "data"), "--image-size", "16", "--batch-size", "8", "--epochs",
                        "1", "--eval-samples", "7", "--eval-steps", "1", "--method", "standard", "--model",
                        "preact_resnet18", "--workers", "0", "--no-progress", "--device", "cpu", "--final-eval",
                        "fast", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [e for e in rec if e["type"] == "epoch"][-1]
    assert epoch["n"] == 7 and 0 <= epoch["clean_acc"] <= 1
    # the final evaluation: batches of ceil(7 / 2) = 4, rank 1 evaluates images 4-6 from its own decode (rank 0
    # holds all 7: the checks' 128 samples), and the report covers all 7
    summary = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["final_eval"]["n"] == 7 and summary["final_eval"]["heldout_images_held"] == 7
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["world_size"] == 2 and report["settings"]["batch_size"] == 4


def test_val_jpeg_draft_decode_is_close_to_a_full_decode(tmp_path):
    # a 320x240 JPEG evaluated at 32 px: PIL decodes it at 1/4 scale (80x60) instead of full size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    a = np.stack([(xx * 0.8) % 256, (yy * 1.0) % 256, ((xx + yy) * 0.4) % 256], -1).astype(np.uint8)
    a = np.clip(a + rng.integers(0, 20, a.shape), 0, 255).astype(np.uint8)
    (tmp_path / "c").mkdir()
    Image.fromarray(a).save(tmp_path / "c" / "big.JPEG", quality=95)
    ds = ImageFolder(tmp_path, train=False, size=32)
    x, _ = ds[0]
    with Image.open(tmp_path / "c" / "big.JPEG") as im:
        im = im.convert("RGB").resize((49, 37), Image.BILINEAR)  # round(32 / 0.875) = 37 on the short side
    ref = torch.from_numpy(np.asarray(im.crop((8, 2, 40, 34)), dtype=np.float32) / 255).permute(2, 0, 1)
    # DCT-domain downscaling vs bilinear from full size: measured 0.0013 mean, 0.0078 max abs difference
    # here; a one-pixel shift of the crop gives 0.010 mean on this image, so the check can tell the two apart
    assert x.shape == ref.shape and (x - ref).abs().mean() < 0.005


def test_tensor_data_resume_keeps_the_augmentation_of_each_batch():
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % 4
    data = TensorData(x, y)
    idx = list(torch.randperm(40).split(8))
    full = [b for b, _ in data.batches(idx, "cpu", 2, 1, "crop-flip")]
    tail = [b for b, _ in data.batches(idx[2:], "cpu", 2, 1, "crop-flip", start=2)]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], tail))
    with pytest.raises(ValueError, match="cannot be resized"):
        list(data.batches(idx, "cpu", 0, 0, size=16))


def test_piecewise_lr_follows_the_points_over_unequal_epochs():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    steps = [4, 2, 8]  # progressive batches: epochs of unequal length
    sch = make_scheduler(opt, "piecewise", sum(steps), lr_points="0:0,1:0.4,3:0.04", epoch_steps=steps)
    got = []
    for _ in range(sum(steps)):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    want = []
    for e, n in enumerate(steps):
        want += [float(np.interp(e + (k + 1) / n, [0, 1, 3], [0, 0.4, 0.04])) for k in range(n)]
    assert got == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="lr_points"):
        TrainConfig(schedule="piecewise", lr_points="0:0.1")
    with pytest.raises(ValueError, match="piecewise"):
        TrainConfig(lr_points="0:0,1:0.1")


def _args(argv):
    import argparse

    from fastadv.train import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def test_recipe_fills_only_what_the_flags_leave_open():
    from fastadv.train.recipes import RECIPES, apply_recipe

    a = _args(["--recipe", "fast-imagenet"])
    apply_recipe(a)
    assert (a.dataset, a.model, a.method, a.epochs, a.amp) == ("imagefolder", "resnet50", "fast", 15, "bf16")
    assert a.alpha == pytest.approx(1.25 * 4 / 255) and a.eval_eps == a.eps == 4 / 255
    assert a.resize_schedule == RECIPES["fast-imagenet"]["resize_schedule"]
    b = _args(["--recipe", "fast-imagenet", "--eps", str(2 / 255), "--epochs", "3", "--no-channels-last"])
    apply_recipe(b)
    assert b.epochs == 3 and b.channels_last is False and b.alpha == pytest.approx(2.5 / 255)
    c = _args(["--recipe", "free-imagenet"])
    apply_recipe(c)
    assert (c.method, c.replays, c.eps, c.epochs, c.batch_size) == ("free", 4, 4 / 255, 23, 256)


def test_dry_run_prints_the_plan_and_the_checkpoint_size(folder, tmp_path, capsys):
    from fastadv.cli import main

    data = tmp_path / "d"
    data.mkdir()
    (data / "train").symlink_to(folder)
    (data / "val").symlink_to(folder)
    common = ["train", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "mnist_cnn", "--width",
              "0.25", "--image-size", "24", "--method", "fast", "--eps", "0.03", "--batch-size", "8",
              "--epochs", "1", "--workers", "0", "--eval-samples", "6", "--eval-steps", "1", "--final-eval", "fast",
              "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main([*common, "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    plan = json.loads(out[-1])
    assert plan["train_images"] == 24 and plan["classes"] == 3 and plan["heldout_images"] == 6
    assert plan["epochs"][0]["batches"] == 3 and plan["config"]["batch_size"] == 8
    assert "checkpoint about" in "\n".join(out) and not (tmp_path / "run").exists()  # nothing trained or written
    assert main(common) == 0
    # the lazily decoded held-out set reached the final fastadv.evaluate as its (x, y) pair
    head = capsys.readouterr().out.strip().splitlines()[-1]
    assert head.startswith("robust accuracy") and "version 'fast'" in head and "6 held-out images" in head, head
    actual = (tmp_path / "run" / "last.pt").stat().st_size
    est = plan["checkpoint"]["total_bytes"]
    # tensors are the bulk; the zip container, RNG states and config add tens of kB (measured 66 kB here)
    assert est <= actual <= est + 200_000, (est, actual)


def test_heldout_eval_batches_decode_only_what_the_rank_reads(folder, monkeypatch):
    # the final evaluation under torchrun: rank r decodes its own batches (i % world == r), batch 0 (evaluate
    # validates it on every rank) and, on rank 0, the batches holding the checks' first `keep` images
    val = ImageFolder(folder, train=False, size=16)
    held = HeldoutImages(val, 10, workers=0)
    seen = []
    get = type(val).__getitem__
    monkeypatch.setattr(type(val), "__getitem__", lambda self, i: seen.append(i) or get(self, i))
    batches = held.eval_batches(10, 2, 4, batch_size=3)  # spans 0-2, 3-5, 6-8, 9: rank 2 reads batch 2
    assert [b[0].shape[0] for b in batches] == [3, 3, 3, 1] and held.decoded_here == 6
    assert seen == held.indices[0:3] + held.indices[6:9] and not held.decoded
    for i in (1, 3):  # placeholders: the right shape, no memory
        assert batches[i][0].shape == (batches[i][0].shape[0], 3, 16, 16) and batches[i][0].stride() == (0, 0, 0, 0)
    seen.clear()
    rank0 = held.eval_batches(10, 0, 4, batch_size=3, keep=5)  # batch 1 holds images 3-5: the checks need 3, 4
    assert seen == held.indices[0:6] and held.decoded_here == 6
    x, y = held
    for got, (lo, hi) in ((batches[0], (0, 3)), (batches[2], (6, 9)), (rank0[1], (3, 6))):
        assert torch.equal(got[0], x[lo:hi]) and torch.equal(got[1], y[lo:hi])
