"""Data modules beyond the IDX files: any torchvision image data set by class name, a folder of
images, and a tensor file. Each meets ``lipvae.data.VAEDataModule``'s contract: inputs in
[0, 1] flattened from ``(C, H, W)``, a seeded train/val/test division, and a ``SplitInfo`` with
digests of what was read, so that a re-evaluation tests on exactly the same inputs or refuses.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lipvae.data import SplitInfo, TensorBatches, VAEDataModule, digest
from lipvae.errors import UserError

log = logging.getLogger("lipvae")


def as_unit_images(array, what: str) -> torch.Tensor:
    """``N × C × H × W`` (or ``N × D``) float32 in [0, 1] from 8- or 16-bit pixels (divided by 255
    or 65,535) or floats already in [0, 1]; one line naming ``what`` otherwise."""
    array = np.asarray(array)
    if array.ndim not in (2, 4):
        raise UserError(f"{what}: got an array of shape {array.shape}; accepted: N × C × H × W images or N × D"
                        " vectors")
    if array.dtype in (np.uint8, np.uint16):
        return torch.as_tensor(array.astype(np.float32)) / float(np.iinfo(array.dtype).max)
    t = torch.as_tensor(array)
    if not t.is_floating_point():
        raise UserError(f"{what}: got {t.dtype} values; accepted: uint8 or uint16 pixels (0-255, 0-65535) or floats"
                        " in [0, 1]")
    t = t.to(torch.float32)
    if len(t) == 0 or not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise UserError(f"{what}: float values outside [0, 1] (or none, or not finite); accepted: inputs scaled to"
                        " [0, 1]")
    return t


def channels_first(array: np.ndarray, what: str) -> np.ndarray:
    """Images as ``N × C × H × W``: ``N × H × W`` is grey-scale, and ``N × H × W × C`` with 1, 3
    or 4 channels last (NumPy's and Keras's layout) is transposed, as the log says."""
    if array.ndim == 3:
        log.info("%s: read %s as N × H × W grey-scale images", what, array.shape)
        return array[:, None]
    if array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        log.info("%s: read %s as N × H × W × C images (channels last)", what, array.shape)
        return array.transpose(0, 3, 1, 2)
    return array


def class_ids(labels: np.ndarray, what: str) -> torch.Tensor:
    """Labels as integer class ids: integers (or whole floats) as they are, names (strings)
    numbered in sorted order, as folder names are; one line for anything else."""
    if labels.dtype.kind in "USO":
        names, ids = np.unique(labels.astype(str), return_inverse=True)
        log.info("%s: %d class names numbered in sorted order (%s)", what, len(names), ", ".join(names[:10]))
        return torch.as_tensor(ids.reshape(labels.shape), dtype=torch.int64)
    if labels.dtype.kind in "iub" or (labels.dtype.kind == "f" and np.isfinite(labels).all()
                                       and (labels == np.round(labels)).all()):
        return torch.as_tensor(labels.astype(np.int64))
    raise UserError(f"{what}: labels of {labels.dtype} values that are not whole numbers; accepted: class ids"
                    " (integers) or class names (strings)")


def image_size(size) -> tuple[int, int] | None:
    """``data.size`` as ``(H, W)``: null keeps the images' own size, an integer is a square, a
    pair is height and width; one line otherwise."""
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    try:
        h, w = pair
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if size is not None and not ok:
        raise UserError(f"data.size: got {size!r}; accepted: null (the images' own size), a positive integer (a"
                        " square) or [height, width]")
    return None if size is None else (h, w)


def pixels(img, size: tuple[int, int] | None, mode: str | None = None) -> np.ndarray:
    """A PIL image's pixels as ``C × H × W`` (of its own dtype, which ``as_unit_images`` judges),
    converted to ``mode`` and resized to ``size`` (bilinear, anti-aliased; PIL's 8-bit resampling
    is integer arithmetic, so every machine reads the same pixels and the recorded digests hold)."""
    from PIL import Image

    img = img.convert(mode) if mode else img
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    a = np.asarray(img)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def one_size(arrays: list[np.ndarray], field: str, where) -> np.ndarray:
    """``arrays`` (``C × H × W`` each) stacked; one line when they differ in size or bit depth."""
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise UserError(f"{field}: {where} holds images of {len(sizes)} sizes ({[s[1:] for s in sizes[:3]]} ...);"
                        " accepted: images of one size, or data.size=[H,W] to resize them")
    if len(depths := sorted({str(a.dtype) for a in arrays})) > 1:
        raise UserError(f"{field}: {where} holds images of {' and '.join(depths)} pixels; accepted: one bit depth")
    return np.stack(arrays)


class DividedDataModule(VAEDataModule):
    """A data module that reads its inputs (``load``: a training pool and, where the source has
    one, a test set) and divides them with ``seed``: ``test_fraction`` of the pool held out for
    testing when there is no test set, ``val_fraction`` of the rest for validation; ``limit``
    keeps the first N inputs of each source (quick runs)."""

    kind = "data"

    def __init__(self, batch_size: int = 128, eval_batch_size: int = 1000, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, limit: int | None = None, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, seed)
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
            raise UserError(f"data.val_fraction, data.test_fraction: got {val_fraction}, {test_fraction};"
                            " accepted: numbers in (0, 1)")
        if limit is not None and (not isinstance(limit, int) or limit < 3):
            raise UserError(f"data.limit: got {limit!r}; accepted: an integer >= 3, or null")
        self.val_fraction, self.test_fraction, self.limit = val_fraction, test_fraction, limit

    def load(self) -> tuple[dict, str]:
        """``({"train": (x, y), "test": (x, y) or absent}, where)``: inputs as ``as_unit_images``
        gives them, integer labels (-1 where none), and where they were read from."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        sources, where = self.load()
        gen = torch.Generator().manual_seed(self.seed)
        digests, parts = {}, {}
        for split, (x, y) in sources.items():
            if self.limit:
                x, y = x[: self.limit], y[: self.limit]
            digests[f"{self.kind}/{split}"] = digest(x, y)
            parts[split] = (x, torch.as_tensor(y, dtype=torch.int64), torch.arange(len(x)))
        shape = tuple(parts["train"][0].shape[1:])
        if "test" in parts and tuple(parts["test"][0].shape[1:]) != shape:
            raise UserError(f"data: the training inputs are {shape} and the test inputs"
                            f" {tuple(parts['test'][0].shape[1:])}; accepted: one shape")
        x, y, index = parts["train"]
        if "test" not in parts:
            perm = torch.randperm(len(x), generator=gen)
            n_test = max(1, int(round(self.test_fraction * len(x))))
            held, pool = perm[:n_test].sort().values, perm[n_test:]
            parts["test"] = (x[held], y[held], index[held])
            x, y, index = x[pool], y[pool], index[pool]
        perm = torch.randperm(len(x), generator=gen)
        n_val = max(1, int(round(self.val_fraction * len(x))))
        val, train = perm[:n_val], perm[n_val:]
        if len(train) == 0:
            more = f"data.limit above {self.limit}" if self.limit else "more in the data"
            raise UserError(f"data: {len(x) + len(parts['test'][0])} inputs leave no training split after"
                            f" {len(parts['test'][0])} test and {n_val} validation inputs; accepted: more inputs"
                            f" ({more}), or smaller data.test_fraction and data.val_fraction")
        tx, ty, tindex = parts["test"]
        splits = {
            "train": TensorBatches(x[train].flatten(1), y[train], index[train]),
            "val": TensorBatches(x[val].flatten(1), y[val], index[val]),
            "test": TensorBatches(tx.flatten(1), ty, tindex),
        }
        info = SplitInfo(self.kind, "train-test" if len(sources) > 1 else "divided", len(train), len(val), len(tx),
                         folder=where, seed=self.seed, sources=digests,
                         indices=digest(*(splits[k].index for k in ("train", "val", "test"))))
        self.set_splits(splits, info, shape)


class TensorFileDataModule(DividedDataModule):
    """Inputs from one tensor file: ``.npy`` (an array), ``.npz`` (``images`` or ``x``, and
    optionally ``labels`` or ``y``) or ``.pt`` (a tensor, or a dict with those keys; read with
    ``weights_only=True``: no code runs). Arrays are ``N × C × H × W`` images or ``N × D``
    vectors, uint8 or uint16 pixels or floats in [0, 1]. Divided into train/val/test with ``seed``."""

    kind = "tensor_file"

    def __init__(self, path: str, batch_size: int = 128, eval_batch_size: int = 1000, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, limit: int | None = None, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, val_fraction, test_fraction, limit, seed)
        if path is None:
            raise UserError("data.path: not set; accepted: a .npy, .npz or .pt file (data.path=...)")
        self.path = Path(str(path)).expanduser()
        if not self.path.is_file():
            raise UserError(f"data.path: got {str(path)!r}, which is not a file; accepted: a .npy, .npz or .pt file")
        if self.path.suffix not in (".npy", ".npz", ".pt", ".pth"):
            raise UserError(f"data.path: got {str(path)!r}; accepted: a .npy, .npz or .pt file")

    def load(self) -> tuple[dict, str]:
        what = f"data.path ({self.path.name})"
        try:
            if self.path.suffix == ".npy":
                content = np.load(self.path, allow_pickle=False)
            elif self.path.suffix == ".npz":
                with np.load(self.path, allow_pickle=False) as f:
                    content = {k: f[k] for k in f.files}
            else:
                content = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{what}: cannot be read as data ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        images, labels = content, None
        if isinstance(content, dict):
            images = next((content[k] for k in ("images", "x") if k in content), None)
            labels = next((content[k] for k in ("labels", "y") if k in content), None)
            if images is None:
                raise UserError(f"{what}: holds the keys {sorted(content)}; accepted: 'images' (or 'x'), and"
                                " optionally 'labels' (or 'y')")
        x = as_unit_images(channels_first(np.asarray(images), what), what)
        y = torch.full((len(x),), -1, dtype=torch.int64) if labels is None else class_ids(np.asarray(labels), what)
        if y.shape != (len(x),):
            raise UserError(f"{what}: {len(x)} inputs but labels of shape {tuple(y.shape)}; accepted: one label each")
        return {"train": (x, y)}, str(self.path.resolve())


class TorchvisionDataModule(DividedDataModule):
    """Any image data set of ``torchvision.datasets`` by class name (``dataset: CIFAR10``), read
    from ``root`` (downloaded there when ``download`` and the network allow): its training and
    test splits, inputs scaled to [0, 1]; validation is ``val_fraction`` of the training split."""

    def __init__(self, dataset: str, root: str, download: bool = True, size=None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 limit: int | None = None, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, val_fraction, test_fraction, limit, seed)
        import torchvision

        self.size = image_size(size)

        cls = getattr(torchvision.datasets, str(dataset), None)
        if not isinstance(cls, type) or not issubclass(cls, torchvision.datasets.VisionDataset):
            names = sorted(n for n in dir(torchvision.datasets) if n[0].isupper())
            raise UserError(f"data.dataset: got {dataset!r}; accepted: a class of torchvision.datasets"
                            f" ({', '.join(names[:12])}, ...)")
        self.cls, self.kind, self.root, self.download = cls, f"torchvision/{dataset}", Path(str(root)).expanduser(), download

    def _read(self, train: bool):
        import inspect

        params = inspect.signature(self.cls).parameters
        how = {"train": train} if "train" in params else {"split": "train" if train else "test"}
        try:
            ds = self.cls(root=str(self.root), download=self.download, **how)
        except Exception as e:
            todo = "put its files there (the download failed)" if self.download else \
                "put its files there or allow data.download"
            raise UserError(f"data: torchvision's {self.cls.__name__} cannot be read from {self.root}"
                            f" ({type(e).__name__}: {str(e).splitlines()[0][:120]}); {todo}") from None
        what = f"data ({self.cls.__name__})"
        data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
        if data is not None and targets is not None:  # the fast path: arrays of pixels
            array = channels_first(np.asarray(data), what)
            if self.size is not None and array.dtype == np.uint8 and array.ndim == 4:
                from PIL import Image

                array = np.stack([pixels(Image.fromarray(a[0] if len(a) == 1 else a.transpose(1, 2, 0)), self.size)
                                  for a in array])
            elif self.size is not None:
                raise UserError(f"data.size: got {list(self.size)}; accepted: null for {self.cls.__name__}, whose"
                                " inputs are not uint8 images")
            return as_unit_images(array, what), torch.as_tensor(np.asarray(targets))
        images, labels = zip(*((pixels(img, self.size), int(t)) for img, t in ds))
        return as_unit_images(one_size(list(images), "data", self.cls.__name__), what), torch.tensor(labels)

    def load(self) -> tuple[dict, str]:
        return {"train": self._read(True), "test": self._read(False)}, str(self.root.resolve())


class ImageFolderDataModule(DividedDataModule):
    """A folder of images: class subfolders (torchvision's ``ImageFolder`` layout, labels from
    their names) or image files directly in it (no labels). All images must have one size, or
    are resized to ``size``; ``channels`` 1 reads them as grey-scale, 3 as RGB. Divided into
    train/val/test with ``seed``."""

    kind = "image_folder"
    SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

    def __init__(self, root: str, channels: int = 1, size=None, batch_size: int = 128, eval_batch_size: int = 1000,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, limit: int | None = None, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, val_fraction, test_fraction, limit, seed)
        if root is None:
            raise UserError("data.root: not set; accepted: a folder of images (data.root=...)")
        self.root = Path(str(root)).expanduser()
        if not self.root.is_dir():
            raise UserError(f"data.root: got {str(root)!r}, which is not a folder; accepted: a folder of images")
        if channels not in (1, 3):
            raise UserError(f"data.channels: got {channels!r}; accepted: 1 (grey-scale), 3 (RGB)")
        self.channels, self.size = channels, image_size(size)

    def load(self) -> tuple[dict, str]:
        from PIL import Image

        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((self.root / c).rglob("*"))
                 if f.suffix.lower() in self.SUFFIXES]
        if not classes:
            files = [(f, -1) for f in sorted(self.root.iterdir()) if f.suffix.lower() in self.SUFFIXES]
        if not files:
            raise UserError(f"data.root: {self.root} holds no images ({', '.join(self.SUFFIXES)})")
        arrays = []
        for f, _ in files:
            with Image.open(f) as img:
                if img.mode in ("I", "F"):  # PIL's conversion to 8 bits would clip them, not scale them
                    raise UserError(f"data.root: {f} holds 32-bit pixels (PIL mode {img.mode}) of unknown range;"
                                    " accepted: 8- or 16-bit images, or data=tensor_file with floats in [0, 1]")
                deep = img.mode.startswith("I;16")  # 16-bit grey-scale, kept as it is (scaled by 65,535)
                a = pixels(img, self.size, None if deep else "L" if self.channels == 1 else "RGB")
                arrays.append(np.repeat(a, self.channels, axis=0) if deep else a)
        x = as_unit_images(one_size(arrays, "data.root", self.root), f"data.root ({self.root})")
        return {"train": (x, torch.tensor([label for _, label in files]))}, str(self.root.resolve())
