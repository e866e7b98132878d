"""Dataset readers on real data: MNIST IDX files, CIFAR-10 release pickles written
from the subset, JPEG folders generated from it, the embedded default, and
clear errors for missing or corrupt files."""
import gzip
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import torch

from fastadv.data import DatasetError, EMBEDDED_DIR, embedded_mnist, load_cifar10, load_mnist
from fastadv.data.imagefolder import ImageFolder, random_resized_crop_box
from fastadv.data.synthetic import SyntheticDataset, synthetic_batch

# test-set class counts, digits 0-9 (shared/data/README.md)
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_test_split(mnist_dir):
    x, y = load_mnist(mnist_dir, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.bincount().tolist() == MNIST_TEST_COUNTS
    assert abs(x.double().mean().item() - 33.791) < 1e-3  # README: mean pixel 33.791
    xf, yf = load_mnist(mnist_dir, "test", as_float=True)
    assert xf.shape == (10000, 1, 28, 28) and xf.dtype == torch.float32
    assert float(xf.min()) == 0.0 and float(xf.max()) == 1.0
    torch.testing.assert_close(xf[:, 0] * 255, x.float())
    assert torch.equal(yf, y)


def test_mnist_train_labels_only_header_checks(mnist_dir):
    from fastadv.data.mnist import read_idx

    labels = read_idx(mnist_dir / "train-labels-idx1-ubyte.gz", 2049)
    assert labels.shape == (60000,) and np.bincount(labels)[0] == 5923


def test_embedded_split_is_deterministic_and_disjoint(mnist_dir):
    assert (EMBEDDED_DIR / "README.md").exists()
    xa, ya = embedded_mnist("all")
    xt, yt = embedded_mnist("train")
    xh, yh = embedded_mnist("heldout")
    assert xt.shape == (8000, 1, 28, 28) and xh.shape == (2000, 1, 28, 28)
    idx = torch.arange(10000)
    assert torch.equal(xh, xa[idx % 5 == 0]) and torch.equal(yt, ya[idx % 5 != 0])
    # the shipped files are the real MNIST test set
    xr, yr = load_mnist(mnist_dir, "test", as_float=True)
    assert torch.equal(xa, xr) and torch.equal(ya, yr)
    # every class is in both parts
    assert (yh.bincount(minlength=10) > 100).all()


def _copy_mnist(mnist_dir, tmp_path):
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / f, tmp_path / f)
    return tmp_path


def test_mnist_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz.*not found"):
        load_mnist(tmp_path, "test")
    with pytest.raises(DatasetError, match="not a directory"):
        load_mnist(tmp_path / "nope", "test")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "val")


def test_mnist_truncated_gzip(mnist_dir, tmp_path):
    d = _copy_mnist(mnist_dir, tmp_path)
    f = d / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:100_000])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz.*(corrupt|truncated)"):
        load_mnist(d, "test")


def test_mnist_wrong_magic_size_and_labels(mnist_dir, tmp_path):
    d = _copy_mnist(mnist_dir, tmp_path)
    lab = d / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(lab.read_bytes()))
    # labels file swapped for an image header: wrong magic
    bad = bytearray(raw)
    bad[3] = 0x03
    lab.write_bytes(gzip.compress(bytes(bad)))
    with pytest.raises(DatasetError, match="magic number 2051, expected 2049"):
        load_mnist(d, "test")
    # a missing byte: the header's count no longer matches
    lab.write_bytes(gzip.compress(bytes(raw[:-1])))
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_mnist(d, "test")
    # a label outside 0-9
    bad = bytearray(raw)
    bad[8 + 17] = 42
    lab.write_bytes(gzip.compress(bytes(bad)))
    with pytest.raises(DatasetError, match="label 42 outside 0-9"):
        load_mnist(d, "test")
    # counts that disagree: 9999 labels for 10000 images
    short = bytearray(raw[:-1])
    short[4:8] = (9999).to_bytes(4, "big")
    lab.write_bytes(gzip.compress(bytes(short)))
    with pytest.raises(DatasetError, match="10000 images.*9999 labels"):
        load_mnist(d, "test")


def test_mnist_reads_unpacked_files(mnist_dir, tmp_path):
    for f in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f).write_bytes(gzip.decompress((mnist_dir / (f + ".gz")).read_bytes()))
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (10000, 28, 28) and y.bincount().tolist() == MNIST_TEST_COUNTS


# ------------------------------------------------------------------ CIFAR-10
def _write_cifar_release(subset_npz, root: pathlib.Path):
    """The cifar-10-batches-py layout from the subset, as the release writes it
    (dicts with bytes keys, data uint8 (N, 3072) in RGB-plane order, labels a list)."""
    d = np.load(subset_npz)
    root.mkdir(parents=True)
    xtr, ytr = d["x_train"], d["y_train"]
    per = xtr.shape[0] // 5
    parts = [(f"data_batch_{i + 1}", xtr[i * per:(i + 1) * per], ytr[i * per:(i + 1) * per]) for i in range(5)]
    parts.append(("test_batch", d["x_test"], d["y_test"]))
    for name, x, y in parts:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                 b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072).copy(),
                 b"filenames": [f"{i}.png".encode() for i in range(len(x))]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in ("airplane", "automobile")]}, f, protocol=2)
    return d


def test_cifar_reader_release_format(cifar_subset, tmp_path):
    d = _write_cifar_release(cifar_subset, tmp_path / "cifar-10-batches-py")
    x, y = load_cifar10(tmp_path, "train")  # the parent folder works too
    assert x.shape == (4660, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(d["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(y, torch.from_numpy(d["y_train"]).long())
    xt, yt = load_cifar10(tmp_path / "cifar-10-batches-py", "test", as_float=False)
    assert xt.dtype == torch.uint8 and torch.equal(xt, torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2))
    assert yt.bincount().tolist() == [97, 78, 94, 95, 85, 84, 105, 96, 98, 100]


def test_cifar_reader_errors(cifar_subset, tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar_release(cifar_subset, root)
    (root / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3: file not found"):
        load_cifar10(root, "train")
    f = root / "test_batch"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(DatasetError, match="test_batch: not a readable CIFAR-10 batch"):
        load_cifar10(root, "test")
    # a pickle that would run code is refused, not executed
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path),))

    f.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load shutil.rmtree"):
        load_cifar10(root, "test")
    assert root.exists()
    f.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DatasetError, match=r"uint8 \(N, 3072\)"):
        load_cifar10(root, "test")


# --------------------------------------------------------------- JPEG folder
def _jpeg_folder(subset_npz, root: pathlib.Path, per_class=4, classes=(3, 0, 7)):
    from PIL import Image

    d = np.load(subset_npz)
    x, y = d["x_test"], d["y_test"]
    names = {0: "airplane", 3: "cat", 7: "horse"}
    made = {}
    for c in classes:
        (root / names[c]).mkdir(parents=True)
        idx = np.nonzero(y == c)[0][:per_class]
        for k, i in enumerate(idx):
            Image.fromarray(x[i]).save(root / names[c] / f"img{k:02d}.JPEG", quality=95)
            made[(names[c], k)] = x[i]
    return made


def test_imagefolder_reads_generated_jpegs(cifar_subset, tmp_path):
    made = _jpeg_folder(cifar_subset, tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, train=False, size=28)
    assert ds.classes == ["airplane", "cat", "horse"] and len(ds) == 12
    for i, (path, label) in enumerate(ds.samples):
        cls, name = pathlib.Path(path).parent.name, pathlib.Path(path).stem
        x, yl = ds[i]
        assert int(yl) == ds.class_to_idx[cls] == label
        assert x.shape == (3, 28, 28) and x.dtype == torch.float32
        # 28 / 0.875 = 32: the resize is the identity, the center crop takes [2:30]
        ref = torch.from_numpy(made[(cls, int(name[3:]))][2:30, 2:30]).permute(2, 0, 1).float() / 255
        assert (x - ref).abs().mean() < 0.03  # JPEG quality 95 on 32x32 CIFAR: measured mean error ~0.01


def test_imagefolder_train_augmentation_and_workers(cifar_subset, tmp_path):
    _jpeg_folder(cifar_subset, tmp_path, per_class=3)
    ds = ImageFolder(tmp_path, train=True, size=24, seed=1)
    a, _ = ds[4]
    b, _ = ds[4]
    assert torch.equal(a, b) and a.shape == (3, 24, 24) and 0 <= float(a.min()) and float(a.max()) <= 1
    ds.set_epoch(1)
    assert not torch.equal(ds[4][0], a)
    # decoding in worker processes gives the same batches as in-process decoding
    ds.set_epoch(0)
    xs0 = torch.cat([xb for xb, _ in ds.loader(4, workers=0, shuffle=False, drop_last=False)])
    xs2 = torch.cat([xb for xb, _ in ds.loader(4, workers=2, shuffle=False, drop_last=False)])
    assert torch.equal(xs0, xs2) and xs0.shape[0] == 9


def test_random_resized_crop_box_bounds():
    import random

    rng = random.Random(0)
    for w, h in ((32, 32), (500, 375), (10, 300)):
        for _ in range(50):
            left, top, cw, ch = random_resized_crop_box(w, h, rng)
            assert 0 <= left and 0 <= top and cw >= 1 and ch >= 1 and left + cw <= w and top + ch <= h


def test_imagefolder_errors(cifar_subset, tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        ImageFolder(tmp_path / "empty")
    _jpeg_folder(cifar_subset, tmp_path / "data", per_class=1)
    bad = tmp_path / "data" / "cat" / "img00.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = ImageFolder(tmp_path / "data", train=False, size=28)
    i = [k for k, (p, _) in enumerate(ds.samples) if p.endswith("cat/img00.JPEG")][0]
    with pytest.raises(DatasetError, match="img00.JPEG: cannot decode image"):
        ds[i]


def test_synthetic():
    ds = SyntheticDataset(10, (3, 8, 8), num_classes=4, seed=3)
    x0, y0 = ds[2]
    assert x0.shape == (3, 8, 8) and 0 <= int(y0) < 4 and torch.equal(ds[2][0], x0)
    assert not torch.equal(ds[3][0], x0)
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match="length"):
        SyntheticDataset(0)
    x, y = synthetic_batch(5, (1, 4, 4), 3, seed=1, channels_last=True)
    assert x.shape == (5, 1, 4, 4) and y.max() < 3 and float(x.min()) >= 0
