"""ImageNet from disk in its original layout, without torchvision.

``path`` holds ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (the class-folder
layout of ILSVRC-2012 as extracted, with the validation images sorted into their
class folders, as torchvision's ``ImageNet`` dataset also arranges them). Classes
are the sorted folder names of ``train`` (index = position), and ``val`` uses the
same mapping. Images are decoded with Pillow and transformed deterministically:
shorter side resized to 256, centre crop 224, scaled to [0, 1] and normalised with
the ImageNet mean and standard deviation. The published package applied a random
crop and flip to both splits; attribution needs fixed inputs, so that is only done
with ``augment=True`` (for training).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dattri.errors import DattriValueError

__all__ = ["ImageFolderDataset", "create_imagenet_dataset"]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp"}


def _transform(img, size: int, crop: int, augment: bool, gen: torch.Generator | None) -> torch.Tensor:
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if augment:  # random resized crop (scale 0.08-1, ratio 3/4-4/3) and a flip
        area = w * h * float(torch.empty(1).uniform_(0.08, 1.0, generator=gen))
        ratio = float(torch.empty(1).uniform_(3 / 4, 4 / 3, generator=gen))
        cw = max(1, min(w, round((area * ratio) ** 0.5)))
        ch = max(1, min(h, round((area / ratio) ** 0.5)))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((crop, crop), Image.BILINEAR)
        if bool(torch.rand(1, generator=gen) < 0.5):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        s = size / min(w, h)
        img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


class ImageFolderDataset(Dataset):
    """``(image (3, crop, crop), label)`` pairs from ``root/<class>/<image>``.

    Args:
        root: the split folder.
        classes: class folder names in label order (default: sorted subfolders).
        size: shorter side after resizing; crop: the centre crop.
        augment: random resized crop and horizontal flip instead (training only).
        seed: seed of the augmentation.
    """

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None,
                 size: int = 256, crop: int = 224, augment: bool = False, seed: int = 0) -> None:
        root = Path(root)
        if not root.is_dir():
            msg = f"{os.fspath(root)!r} is not a folder of class folders (<class>/<image>)."
            raise DattriValueError(msg)
        self.classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(f, self.class_to_idx[c]) for c in self.classes if (root / c).is_dir()
                        for f in sorted((root / c).iterdir()) if f.suffix.lower() in _EXTENSIONS]
        if not self.samples:
            msg = (f"no images under {os.fspath(root)!r}; expected <class>/<image>.JPEG "
                   "(the ImageNet class-folder layout).")
            raise DattriValueError(msg)
        self.targets = [t for _, t in self.samples]
        self.size, self.crop, self.augment = size, crop, augment
        self._gen = torch.Generator().manual_seed(seed) if augment else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            return _transform(img, self.size, self.crop, self.augment, self._gen), label


def create_imagenet_dataset(path: str | os.PathLike, size: int = 256, crop: int = 224,
                            augment_train: bool = False) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """``(train, val)`` ImageNet datasets from ``path`` (``train/`` and ``val/`` class
    folders; the validation set uses the training classes' indices)."""
    if path is None or not Path(path, "train").is_dir() or not Path(path, "val").is_dir():
        msg = (f"path={path!r} must hold ImageNet's train/ and val/ class folders "
               "(train/<wnid>/*.JPEG, val/<wnid>/*.JPEG); no offline copy of ImageNet exists.")
        raise DattriValueError(msg)
    train = ImageFolderDataset(Path(path, "train"), size=size, crop=crop, augment=augment_train)
    val = ImageFolderDataset(Path(path, "val"), classes=train.classes, size=size, crop=crop)
    return train, val
