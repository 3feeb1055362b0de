"""Data for the family: Fashion-MNIST from its IDX ``.gz`` files, or any ImageFolder tree (ImageNet layout).

Batches are ``(images, labels)``: images uint8 (N, C, H, W), labels int64 (N,). ``preprocess`` turns them into
normalised float32 ``(x / 255 − mean) / std``. Three splits: ``train`` (minus a held-out ``val`` of ``val_size``
images, chosen by a seeded permutation: the selector chooses on it, training never sees it) and ``test`` (never used
to choose anything: the selector's promise and every accuracy claim are checked on it).

Sources, picked from what ``--data DIR`` holds (default: ``default_data_dir()``):
  * ``train-images-idx3-ubyte.gz`` etc. (Debian ``dataset-fashion-mnist``, /usr/share/datasets/fashion-mnist):
    loaded whole onto the device (60k x 28 x 28 bytes); augmentation (shift by up to 2 px, horizontal flip) on the GPU.
  * ``train/<class>/*`` and ``val/<class>/*``: torchvision ImageFolder through a DataLoader, resize + centre crop to
    ``image_size`` for evaluation; for training the same plus the device-side shift + flip when ``image_size`` <= 64
    (the recipe used on Fashion-MNIST, unchanged), RandomResizedCrop + flip for larger images.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from impl.common.results import ROOT

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CARRY_DIR = ROOT / ".carry" / "seam" / "fashion-mnist"  # git-ignored; travels to the GPU
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_IMAGE = 64  # at most this many pixels a side: small-image stem, shift + flip augmentation


def default_data_dir() -> Path:
    """``$SEAM_DATA`` if set; else the Debian package's folder or ``.carry/seam/fashion-mnist``, whichever holds the
    files (the Debian folder when neither does, so errors name it)."""
    if os.environ.get("SEAM_DATA"):
        return Path(os.environ["SEAM_DATA"])
    for d in (FMNIST_DIR, CARRY_DIR):
        if (d / IDX_FILES["train"][0]).exists():
            return d
    return FMNIST_DIR


def prepare_carry(src: Path = FMNIST_DIR, dest: Path = CARRY_DIR) -> Path:
    """Copy the four Fashion-MNIST .gz files into ``.carry/seam/fashion-mnist`` (30 MB) for a machine without them."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for pair in IDX_FILES.values():
        for name in pair:
            if not (src / name).exists():
                raise FileNotFoundError(f"{src / name} not found (apt-get install dataset-fashion-mnist)")
            shutil.copyfile(src / name, dest / name)
    return dest


# ---- IDX -----------------------------------------------------------------------------------------------------------

def _read_gz(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (install the Debian package dataset-fashion-mnist or pass --data)")
    with gzip.open(path, "rb") as f:
        return f.read()


def read_idx_images(path: str | Path) -> np.ndarray:
    """uint8 (N, H, W) from an IDX3 file: magic 2051, then N, H, W as big-endian int32, pixels from offset 16."""
    raw = _read_gz(Path(path))
    if len(raw) < 16:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX3 header")
    magic, n, h, w = np.frombuffer(raw[:16], dtype=">i4")
    if magic != 2051:
        raise ValueError(f"{path}: IDX magic {magic}, expected 2051 (unsigned bytes, 3 dimensions)")
    if len(raw) != 16 + n * h * w:
        raise ValueError(f"{path}: header says {n}x{h}x{w} pixels but the file holds {len(raw) - 16} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """uint8 (N,) from an IDX1 file: magic 2049, then N as big-endian int32, labels from offset 8."""
    raw = _read_gz(Path(path))
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX1 header")
    magic, n = np.frombuffer(raw[:8], dtype=">i4")
    if magic != 2049:
        raise ValueError(f"{path}: IDX magic {magic}, expected 2049 (unsigned bytes, 1 dimension)")
    if len(raw) != 8 + n:
        raise ValueError(f"{path}: header says {n} labels but the file holds {len(raw) - 8} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=8).copy()


def write_idx(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    """Write uint8 images (N, H, W) and labels (N,) as gzipped IDX files (tests, tiny synthetic sets)."""
    n, h, w = images.shape
    with gzip.open(image_path, "wb") as f:
        f.write(np.array([2051, n, h, w], dtype=">i4").tobytes() + images.astype(np.uint8).tobytes())
    with gzip.open(label_path, "wb") as f:
        f.write(np.array([2049, n], dtype=">i4").tobytes() + labels.astype(np.uint8).tobytes())


# ---- splits --------------------------------------------------------------------------------------------------------

class Split(Protocol):
    def __len__(self) -> int: ...
    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class TensorSplit:
    """A split held whole in memory (on the training device): images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        if shuffle:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(n, generator=g).to(self.images.device)
        else:
            order = None
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            idx = slice(i, min(i + batch_size, n)) if order is None else order[i: i + batch_size]
            yield self.images[idx], self.labels[idx]

    def head(self, n: int) -> "TensorSplit":
        return TensorSplit(self.images[:n], self.labels[:n])


class FolderSplit:
    """An ImageFolder split (or a subset of one) read through a DataLoader; batches land on ``device``."""

    def __init__(self, dataset: Any, device: str, indices: list[int] | None = None, workers: int = 8) -> None:
        self.dataset, self.device, self.workers = dataset, device, workers
        self.indices = list(range(len(dataset))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader, Subset

        order = self.indices
        if shuffle:
            perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
            order = [order[i] for i in perm]
        loader = DataLoader(Subset(self.dataset, order), batch_size=batch_size, shuffle=False, drop_last=drop_last,
                            num_workers=min(self.workers, os.cpu_count() or 1), pin_memory=self.device == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def head(self, n: int) -> "FolderSplit":
        return FolderSplit(self.dataset, self.device, self.indices[:n], self.workers)


@dataclass
class DataBundle:
    """The three splits plus what a model needs to know about the images."""

    train: Any
    val: Any
    test: Any
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str                      # "idx" or "folder"
    source: str                    # the data folder, relative to the repository when inside it (``source_of``)
    gpu_augment: bool = True       # shift + flip on the device (idx); folders augment in their transforms
    info: dict[str, Any] = field(default_factory=dict)


def source_of(data_dir: Path) -> str:
    """How records name a data folder: relative to the repository when inside it (no machine's checkout path),
    else as given."""
    try:
        return Path(data_dir).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(data_dir)


def preprocess(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], channels: int | None = None,
               channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 − mean) / std``; 1 channel is repeated if ``channels`` asks for 3."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    c = x.shape[1]
    if channels is not None and channels != c:
        if c != 1:
            raise ValueError(f"cannot turn {c}-channel images into {channels} channels")
        x = x.expand(-1, channels, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def augment_shift_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and a random horizontal flip, per image (uint8 in/out)."""
    n = images.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return shift_flip(images, dy, dx, flip, pad)


def shift_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """``out[i, :, r, c] = P[i, :, r + dy[i], c' + dx[i]]`` with P the zero-padded images and ``c' = w-1-c`` where
    ``flip[i]`` else ``c``: a crop of the padded image at offset (dy, dx), mirrored left-right when flipped."""
    n, c, h, w = images.shape
    dev = images.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]                          # (n, h)
    cols = torch.arange(w, device=dev)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]                # (n, w)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


# ---- loading -------------------------------------------------------------------------------------------------------

def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def load_idx(data_dir: Path, device: str, *, val_size: int, seed: int, image_size: int | None,
             limits: tuple[int, int, int] | None) -> DataBundle:
    tr_x = read_idx_images(data_dir / IDX_FILES["train"][0])
    tr_y = read_idx_labels(data_dir / IDX_FILES["train"][1])
    te_x = read_idx_images(data_dir / IDX_FILES["test"][0])
    te_y = read_idx_labels(data_dir / IDX_FILES["test"][1])
    if len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
        raise ValueError(f"{data_dir}: image and label counts differ "
                         f"({len(tr_x)}/{len(tr_y)}, {len(te_x)}/{len(te_y)})")
    if val_size >= len(tr_x):
        raise ValueError(f"val_size {val_size} leaves no training images out of {len(tr_x)}")
    perm = np.random.default_rng(seed).permutation(len(tr_x))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    size = image_size or tr_x.shape[-1]

    def split(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None, limit: int | None) -> TensorSplit:
        if idx is not None:
            x, y = x[idx], y[idx]
        if limit is not None:
            x, y = x[:limit], y[:limit]
        xt = _resize_uint8(torch.from_numpy(np.array(x, dtype=np.uint8))[:, None], size)
        return TensorSplit(xt.to(device), torch.from_numpy(y.astype(np.int64)).to(device))

    lt, lv, le = limits or (None, None, None)
    train = split(tr_x, tr_y, train_idx, lt)
    pix = tr_x[train_idx].astype(np.float64) / 255.0
    mean, std = float(pix.mean()), float(pix.std())
    return DataBundle(train=train, val=split(tr_x, tr_y, val_idx, lv), test=split(te_x, te_y, None, le),
                      num_classes=int(max(tr_y.max(), te_y.max())) + 1, channels=1, image_size=size,
                      mean=(mean,), std=(std,), kind="idx", source=source_of(data_dir), gpu_augment=True,
                      info={"val_size": val_size, "split_seed": seed})


def load_folder(data_dir: Path, device: str, *, val_size: int, seed: int, image_size: int | None,
                limits: tuple[int, int, int] | None) -> DataBundle:
    try:
        from torchvision import datasets, transforms
    except ImportError as e:  # pragma: no cover - torchvision ships with timm's requirements
        raise ImportError("ImageFolder data needs torchvision") from e
    size = image_size or 224
    small = size <= SMALL_IMAGE
    to_u8 = transforms.PILToTensor()
    eval_tf = transforms.Compose([transforms.Resize(size if small else int(round(size / 0.875))),
                                  transforms.CenterCrop(size), to_u8])
    train_tf = eval_tf if small else transforms.Compose([transforms.RandomResizedCrop(size),
                                                         transforms.RandomHorizontalFlip(), to_u8])
    rgb = lambda p: datasets.folder.default_loader(p).convert("RGB")  # noqa: E731
    train_ds = datasets.ImageFolder(str(data_dir / "train"), transform=train_tf, loader=rgb)
    val_ds = datasets.ImageFolder(str(data_dir / "train"), transform=eval_tf, loader=rgb)
    test_ds = datasets.ImageFolder(str(data_dir / "val"), transform=eval_tf, loader=rgb)
    if train_ds.classes != test_ds.classes:
        raise ValueError(f"{data_dir}: train/ and val/ have different class folders")
    if val_size >= len(train_ds):
        raise ValueError(f"val_size {val_size} leaves no training images out of {len(train_ds)}")
    perm = np.random.default_rng(seed).permutation(len(train_ds)).tolist()
    lt, lv, le = limits or (None, None, None)
    val_idx, train_idx = perm[:val_size][:lv], perm[val_size:][:lt]
    test_idx = list(range(len(test_ds)))[:le]
    workers = 8 if device == "cuda" else 0  # worker processes pay off feeding a GPU; on a CPU they only cost spawns
    return DataBundle(train=FolderSplit(train_ds, device, train_idx, workers),
                      val=FolderSplit(val_ds, device, val_idx, workers),
                      test=FolderSplit(test_ds, device, test_idx, workers), num_classes=len(train_ds.classes),
                      channels=3,
                      image_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, kind="folder", source=source_of(data_dir),
                      gpu_augment=small, info={"val_size": val_size, "split_seed": seed, "classes": train_ds.classes})


def load_data(data_dir: str | Path | None = None, device: str = "cpu", *, val_size: int = 10000, seed: int = 0,
              image_size: int | None = None, limits: tuple[int, int, int] | None = None) -> DataBundle:
    """Load the splits from ``data_dir`` (IDX files or an ImageFolder tree; a relative path that is not a folder here
    is taken from the repository, as records name it, ``source_of``); ``limits`` caps (train, val, test)."""
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    if not d.is_absolute() and not d.is_dir() and (ROOT / d).is_dir():
        d = ROOT / d
    if (d / IDX_FILES["train"][0]).exists():
        return load_idx(d, device, val_size=val_size, seed=seed, image_size=image_size, limits=limits)
    if (d / "train").is_dir() and (d / "val").is_dir():
        return load_folder(d, device, val_size=val_size, seed=seed, image_size=image_size, limits=limits)
    raise FileNotFoundError(f"{d} holds neither Fashion-MNIST IDX files ({IDX_FILES['train'][0]}, ...) nor an "
                            "ImageFolder tree (train/<class>/, val/<class>/); pass --data, set SEAM_DATA, or run "
                            "`python -m impl.seam.experiments --prepare` where the Debian package is installed and "
                            "carry .carry/seam")
