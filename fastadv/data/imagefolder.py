"""ImageNet-style folder of images: ``root/<class>/<image>.JPEG``, one subfolder per class.

Classes are the sorted subfolder names (index = position), as in
torchvision's ``ImageFolder``. Images are decoded with PIL inside
``torch.utils.data.DataLoader`` worker processes (``fastadv.data.loader``
for training, ``loader(...)`` for a plain one), so decoding runs beside
training. ``load(i, epoch, size, key)`` is a pure function of its
arguments: the augmentation of sample i in an epoch is the same whichever
worker, rank or resumed run decodes it, and ``size`` changes per call
(progressive resizing). Augmentation, without torchvision:

* train: RandomResizedCrop (Szegedy et al. 2015: area fraction in
  [0.08, 1], aspect ratio in [3/4, 4/3], 10 tries, then a center crop) to
  ``size`` and a horizontal flip with probability 1/2;
* val: resize the shorter side to ``round(size / 0.875)`` (256 for 224) and
  center-crop ``size``; a JPEG is decoded at reduced scale (PIL ``draft``:
  1/2, 1/4 or 1/8, DCT scaling) when that still covers the resize, so a
  held-out set at 128 px does not decode full-size images.

Output: float32 (3, size, size) in [0, 1] (normalisation belongs to the
model). :func:`dali_loader` is an NVIDIA DALI pipeline of the same kind of
augmentation (its own random draws, not the per-sample streams above); the
trainer does not use it.
"""
from __future__ import annotations

import math
import os
import pathlib
import random

import numpy as np
import torch

from fastadv.data.mnist import DatasetError

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS", "random_resized_crop_box", "dali_available", "dali_loader"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a declared dependency
        raise ImportError("fastadv.data.ImageFolder needs Pillow: pip install pillow") from exc
    return Image


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, w, h) of a RandomResizedCrop box, torchvision's algorithm."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # fallback: the whole image, cropped to the allowed aspect range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root/<class>/``, returned as (float32 (3, size, size) in [0, 1], int64 label).

    Args:
        root: folder with one subfolder per class.
        train: True for random-resized-crop + flip, False for resize + center crop.
        size: output side (224 for ImageNet).
        seed: seeds the augmentation; each (epoch, index) pair gets its own
            stream, so a run is reproducible whatever the worker count.
    Raises:
        DatasetError: root missing, no class folders, or no images; an
            unreadable image raises DatasetError naming its path when loaded.
    """

    def __init__(self, root, train: bool = True, size: int = 224, seed: int = 0):
        root = pathlib.Path(os.fspath(root)).expanduser()
        if not root.is_dir():
            raise DatasetError(f"image folder root {root} is not a directory")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DatasetError(f"{root}: no class subfolders (expected root/<class>/<image>.jpg)")
        samples = []
        for i, c in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        samples.append((os.path.join(dirpath, f), i))
        if not samples:
            raise DatasetError(f"{root}: no image files with extensions {IMAGE_EXTENSIONS} in {len(classes)} class folders")
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.root, self.classes, self.samples = root, classes, samples
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.train, self.size, self.seed, self.epoch = bool(train), int(size), int(seed), 0
        self.targets = [s[1] for s in samples]

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (call once per epoch, before iterating)."""
        self.epoch = int(epoch)

    def path(self, i: int) -> str:
        """The file behind sample ``i``."""
        return self.samples[i][0]

    def __getitem__(self, i):
        return self.load(i, self.epoch, self.size)

    def load(self, i: int, epoch: int, size: int | None = None, key: int | None = None):
        """Sample ``i`` for ``epoch`` at side ``size`` (default: ``self.size``): a pure function of its arguments.

        The training augmentation draws from ``random.Random`` seeded by
        (seed, epoch, key), ``key`` defaulting to ``i``: the same crop and flip
        whichever worker, rank or resume loads it. ``fastadv.data.loader``
        passes the index of a skipped unreadable image as ``key`` for its
        replacement, so the replacement does not repeat its own crop.
        Returns (float32 (3, size, size) in [0, 1], int64 label).
        """
        path, label = self.samples[i]
        s = self.size if size is None else int(size)
        Image = _pil()
        key = i if key is None else int(key)
        try:
            with Image.open(path) as im:
                if not self.train:
                    # decode at the eval size: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling)
                    # when that still leaves the shorter side >= round(s / 0.875)
                    short = max(s, int(round(s / 0.875)))
                    r = short / min(im.width, im.height)
                    im.draft("RGB", (max(1, math.ceil(im.width * r)), max(1, math.ceil(im.height * r))))
                im = im.convert("RGB")
        except Exception as exc:
            raise DatasetError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
        if self.train:
            rng = random.Random((self.seed * 1_000_003 + int(epoch)) * 10_000_019 + key)
            left, top, w, h = random_resized_crop_box(im.width, im.height, rng)
            im = im.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = max(s, int(round(s / 0.875)))
            if im.width <= im.height:
                nw, nh = short, max(short, int(round(im.height * short / im.width)))
            else:
                nh, nw = short, max(short, int(round(im.width * short / im.height)))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - s) // 2, (nh - s) // 2
            im = im.crop((left, top, left + s, top + s))
        arr = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return x, torch.tensor(label, dtype=torch.int64)

    def loader(self, batch_size: int, *, workers: int = 4, shuffle: bool | None = None, sampler=None,
               drop_last: bool | None = None, pin_memory: bool = False, seed: int = 0):
        """A DataLoader that decodes in ``workers`` processes (0 = in the main process)."""
        shuffle = self.train if shuffle is None else shuffle
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
            num_workers=workers, drop_last=self.train if drop_last is None else drop_last,
            pin_memory=pin_memory, persistent_workers=workers > 0, generator=g,
        )


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def dali_loader(root, batch_size: int, *, train: bool = True, size: int = 224, workers: int = 4,
                device_id: int = 0, shard_id: int = 0, num_shards: int = 1, seed: int = 0):
    """NVIDIA DALI pipeline with the same augmentation, JPEG decoded on the GPU (nvJPEG).

    Yields (x float32 (B, 3, size, size) in [0, 1] on cuda:device_id, y int64 (B,)).
    Sharded like a DistributedSampler (``shard_id`` = rank, ``num_shards`` =
    world size). Raises ImportError when DALI is not installed.
    """
    if not dali_available():
        raise ImportError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda120); use ImageFolder.loader")
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=device_id, seed=seed)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=train, shard_id=shard_id,
                                        num_shards=num_shards, name="reader")
        if train:
            images = fn.decoders.image_random_crop(jpegs, device="mixed", output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4 / 3])
            images = fn.resize(images, resize_x=size, resize_y=size)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=round(size / 0.875))
            mirror = False
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
                                          mean=[0.0] * 3, std=[255.0] * 3, mirror=mirror)
        return images, labels.gpu()

    p = pipe()
    p.build()
    it = DALIGenericIterator(p, ["x", "y"], reader_name="reader",
                             last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL)
    for batch in it:
        yield batch[0]["x"], batch[0]["y"].squeeze(-1).long()
