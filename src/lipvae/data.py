"""MNIST and Fashion-MNIST as in-memory tensors, found offline where possible.

Where a split's IDX files are looked for, in order: ``$LIPVAE_DATA_DIR/<name>``,
``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist``), ``shared/data/<name>``
beside the project folder (or the current folder), then torchvision's download into
``$LIPVAE_CACHE_DIR`` (default ``~/.cache/lipvae``) when ``data.download`` allows and the
network answers. An explicit ``data.root`` replaces that search: only that folder is used
(and downloaded into). Each place may hold the files directly (``.gz`` or not) or in
torchvision's ``<Class>/raw/`` layout.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lipvae.catalog import DATASETS
from lipvae.errors import UserError



def _beside_project() -> list[Path]:
    """Folders that may hold a ``shared/`` sibling: the source checkout (when lipvae runs from
    one) and the current working folder."""
    here = Path(__file__).resolve().parents[2]
    roots = [here] if (here / "pyproject.toml").is_file() else []
    return [*roots, Path.cwd()]

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking its header against its size."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"data: cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"data: {path} is not an IDX file (bad magic number); re-download it")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"data: {path} is truncated (header incomplete); re-download it")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(
            f"data: {path} is corrupt ({len(raw)} bytes, header says {expected}); re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def candidate_dirs(name: str, root: str | None) -> list[Path]:
    """The places searched for ``name``, in order (each also tried in torchvision's layout)."""
    if root:
        places = [Path(root).expanduser()]
    else:
        places = []
        if os.environ.get("LIPVAE_DATA_DIR"):
            places.append(Path(os.environ["LIPVAE_DATA_DIR"]).expanduser() / name)
        places += [Path("/usr/share/datasets") / d for d in DATASETS[name]["debian"]]
        places += [p.parent / "shared" / "data" / name for p in _beside_project()]
        places.append(download_dir() / name)  # an earlier download
    expanded = []
    for p in dict.fromkeys(places):
        expanded += [p, p / DATASETS[name]["class"] / "raw", p / name]
    return expanded


def check_root(root: str | None) -> None:
    """An explicit ``data.root`` must be an existing folder: never a silent fallback elsewhere."""
    if root is None:
        return
    path = Path(str(root)).expanduser()
    if not path.exists():
        raise UserError(f"data.root: got {str(root)!r}, which does not exist; accepted: a folder holding the IDX files, or null to search")
    if not path.is_dir():
        raise UserError(f"data.root: got {str(root)!r}, which is not a folder; accepted: a folder holding the IDX files, or null to search")


def find_split(name: str, split: str, root: str | None) -> tuple[Path, Path] | None:
    images, labels = SPLIT_FILES[split]
    for d in candidate_dirs(name, root):
        found = _idx_file(d, images), _idx_file(d, labels)
        if all(found):
            return found  # type: ignore[return-value]
    return None


def download_dir() -> Path:
    return Path(os.environ.get("LIPVAE_CACHE_DIR", Path.home() / ".cache" / "lipvae"))


def _download(name: str, split: str, root: str | None = None) -> tuple[Path, Path] | None:
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[name]["class"])
    target = Path(root).expanduser() if root else download_dir() / name
    before = _existing_folders(target)
    try:
        cls(root=str(target), train=(split == "train"), download=True)
    except Exception:  # any network failure means "not available"
        _remove_new_empty_folders(target, before)  # torchvision made <Class>/raw/ before failing
        return None
    return find_split(name, split, str(target))


def _existing_folders(root: Path) -> set[Path]:
    folders, top = set(), Path(root)
    while True:
        if top.is_dir():
            folders.add(top)
        if top.parent == top:
            break
        top = top.parent
    return folders | ({p for p in Path(root).rglob("*") if p.is_dir()} if Path(root).is_dir() else set())


def _remove_new_empty_folders(root: Path, before: set[Path]) -> None:
    """Remove the folders below (and including) ``root`` that did not exist in ``before`` and are empty."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder in sorted((p for p in [root, *root.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
        if folder not in before and not any(folder.iterdir()):
            folder.rmdir()
    for parent in root.parents:  # download_dir()/<name> may have been made on the way
        if parent in before or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


def load_split(
    name: str, split: str, root: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray, Path]:
    """Images (N × H × W, uint8), labels and the folder they were read from, of one official split."""
    if name not in DATASETS:
        raise UserError(f"data.name: unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    found = find_split(name, split, root) or (_download(name, split, root) if download else None)
    if found is None:
        where = ", ".join(dict.fromkeys(str(p) for p in candidate_dirs(name, root)[::3]))
        how = (
            "apt-get install dataset-fashion-mnist"
            if name == "fashion_mnist"
            else f"put {SPLIT_FILES[split][0]}(.gz) in one of them"
        )
        extra = " or use data.resplit=true to split the test set" if split == "train" else ""
        raise UserError(
            f"data: {name} {split} split not found (looked in {where}"
            f"{'; download failed' if download else '; download disabled'}); {how}, set data.root"
            f" or LIPVAE_DATA_DIR{extra}"
        )
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"data: {found[0]} and {found[1]} do not match (shapes {images.shape}, {labels.shape})")
    return images, labels, found[0].parent.resolve()


class TensorBatches(Dataset):
    """Images and labels held as tensors; batches are fetched by one indexing op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        self.images, self.labels, self.index = images, labels, index

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], self.index[i]

    def __getitems__(self, idx: list[int]):
        i = torch.as_tensor(idx)
        return self.images[i], self.labels[i], self.index[i]


def _as_batch(batch):
    return batch


def digest(*arrays) -> str:
    """SHA-256 (first 16 hex digits) of arrays' bytes: a short name for exact contents."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@dataclass
class SplitInfo:
    """Which images a run trained, validated and tested on, exactly: recorded in results.json
    (``data``) so that a re-evaluation rebuilds the same split or refuses (``check_same``)."""

    name: str
    split: str
    num_train: int
    num_val: int
    num_test: int
    folder: str | None = None  # where the images were read from
    train_folder: str | None = None  # the official training split's, when different
    seed: int | None = None  # the seed that divided the split
    sources: dict | None = None  # source file -> digest of its images and labels
    indices: str | None = None  # digest of the train, val and test index lists (positions in their files)
    input_shape: list | None = None  # the shape of one input: [C, H, W] for images, [D] for vectors

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def check_same(self, recorded: dict, run_dir) -> None:
        """One line when this split is not the one ``recorded`` (a run's results.json ``data``)."""
        for key in ("split", "num_train", "num_val", "num_test", "input_shape"):
            if recorded.get(key) is not None and recorded[key] != getattr(self, key):
                raise UserError(
                    f"data: {run_dir} was trained on another split ({key}: recorded {recorded[key]!r}, rebuilt"
                    f" {getattr(self, key)!r}); its re-evaluation would test on other images"
                )
        sources = recorded.get("sources") or {}
        if not isinstance(sources, dict):
            raise UserError(f"data.sources: {run_dir}/results.json records a {type(sources).__name__}; accepted: a"
                            " mapping of source files to digests (the record is damaged: re-run the training)")
        for name, was in sources.items():
            now = (self.sources or {}).get(name)
            if now != was:
                found = "is missing" if now is None else "differs from the one the run read"
                raise UserError(
                    f"data: {run_dir} was trained on a {name} file that {found} (digest {was}); put the run's"
                    f" data back (data.root or LIPVAE_DATA_DIR) to re-evaluate it"
                )
        if recorded.get("indices") and recorded["indices"] != self.indices:
            raise UserError(
                f"data: {run_dir}'s train/val/test division cannot be rebuilt (digest recorded {recorded['indices']},"
                f" rebuilt {self.indices}); its re-evaluation would test on other images"
            )


class ResumingLoader(DataLoader):
    """The training loader of a ``VAEDataModule``: it resumes mid-epoch, from the data module's
    own state (``VAEDataModule.state_dict``: the order's generator and the batches done). These
    two methods tell Lightning so; it warns that a loader without them cannot resume."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class VAEDataModule(L.LightningDataModule):
    """What lipvae needs of a data module: the contract every ``data`` entry's ``_target_`` meets.

    After ``setup()``:

    - ``split(name)`` for ``"train"``, ``"val"`` and ``"test"``: a ``TensorBatches`` of flat
      float inputs in [0, 1] (``images``: N × D), integer ``labels`` (N; -1 where there are none)
      and ``index`` (N: each input's position in its source, which certification, the attack and
      the tables name it by);
    - ``input_shape``: the shape of one input before flattening, ``(C, H, W)`` for images (the
      convolutional networks need it) or ``(D,)``; ``D`` is its product;
    - ``info``: a ``SplitInfo`` naming the data, its division and digests of what was read, which
      ``results.json`` records and a re-evaluation checks (``info.check_same``).

    The loaders come from the splits (``batch_size`` for training, shuffled with ``seed``;
    ``eval_batch_size`` for validation and testing). A subclass implements ``setup()`` and calls
    ``set_splits``; ``check_datamodule`` checks any data module against this contract, in one line.
    """

    def __init__(self, batch_size: int = 128, eval_batch_size: int = 1000, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.info: SplitInfo | None = None
        self._splits: dict[str, TensorBatches] = {}
        self._shape: tuple[int, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        self.setup()
        return self._shape

    def set_splits(self, splits: dict[str, TensorBatches], info: SplitInfo, input_shape) -> None:
        """Record what ``setup()`` made: the three splits, their identity and the input shape."""
        self._splits, self._shape = dict(splits), tuple(int(s) for s in input_shape)
        info.input_shape = list(self._shape)
        self.info = info

    def split(self, name: str) -> TensorBatches:
        self.setup()
        return self._splits[name]

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if not shuffle:
            return DataLoader(self.split(split), batch_size=batch_size, collate_fn=_as_batch)
        self._sampler = ResumableOrder(self.split(split), self._order(), batch_size)
        self._sampler.resume_at, self._resume_at = getattr(self, "_resume_at", None), None
        # the generator too: the loader's iterators draw their base seed from it, not from torch's
        # global stream (the VAE's latent samples)
        return ResumingLoader(self.split(split), batch_size=batch_size, sampler=self._sampler, collate_fn=_as_batch,
                              generator=self._order())

    def _order(self) -> torch.Generator:
        """The generator of the training batches' order: seeded once, advanced by every epoch's
        shuffle, and saved in checkpoints (``state_dict``), so a resumed run sees the batches the
        uninterrupted one would have."""
        if getattr(self, "_shuffle", None) is None:
            self._shuffle = torch.Generator().manual_seed(self.seed)
            if getattr(self, "_shuffle_state", None) is not None:
                self._shuffle.set_state(self._shuffle_state)
        return self._shuffle

    def state_dict(self) -> dict:
        """The order's generator; within an epoch (a checkpoint on a stop), also the generator's
        state when the epoch began and the batches it has trained on, so that a resume re-draws
        the epoch's order and goes on with the batch after them."""
        state = {"shuffle": self._order().get_state()}
        sampler, trainer = getattr(self, "_sampler", None), getattr(self, "trainer", None)
        if sampler is not None and sampler.epoch_start is not None and trainer is not None:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            if done < trainer.num_training_batches:
                state.update(epoch_start=sampler.epoch_start, batches_done=int(done))
        return state

    def load_state_dict(self, state: dict) -> None:
        if state and state.get("shuffle") is not None:
            self._shuffle_state = state["shuffle"]
            if getattr(self, "_shuffle", None) is not None:
                self._shuffle.set_state(self._shuffle_state)
        if state and state.get("epoch_start") is not None:
            self._resume_at = (state["epoch_start"], int(state["batches_done"]))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


class ResumableOrder(RandomSampler):
    """PyTorch's RandomSampler (the same draws from the same generator, so the same batches)
    that remembers the generator's state when its epoch began: ``resume_at = (state, batches)``
    makes the next epoch re-draw that epoch's order and skip the batches already trained on."""

    def __init__(self, data, generator: torch.Generator, batch_size: int) -> None:
        super().__init__(data, generator=generator)
        self.batch_size = batch_size
        self.epoch_start: torch.Tensor | None = None
        self.resume_at: tuple[torch.Tensor, int] | None = None

    def __iter__(self):
        skip = 0
        if self.resume_at is not None:
            (state, batches), self.resume_at = self.resume_at, None
            self.generator.set_state(state)
            skip = batches * self.batch_size
        self.epoch_start = self.generator.get_state()
        for i, index in enumerate(super().__iter__()):
            if i >= skip:
                yield index


def check_datamodule(dm, target: str = "data") -> None:
    """One line naming the first part of ``VAEDataModule``'s contract that ``dm`` misses (called
    once it is built and set up, before any model is built or trained)."""
    name = f"data: {type(dm).__module__}.{type(dm).__qualname__}"
    see = "; see docs/extending.md, 'Your own data' (lipvae.data.VAEDataModule)"
    if not isinstance(dm, L.LightningDataModule):
        raise UserError(f"{name} is not a LightningDataModule{see}")
    for attr in ("split", "setup"):
        if not callable(getattr(dm, attr, None)):
            raise UserError(f"{name} has no {attr}() method{see}")
    shape = getattr(dm, "input_shape", None)
    if not (isinstance(shape, (tuple, list)) and len(shape) in (1, 3) and all(isinstance(s, int) and s > 0 for s in shape)):
        raise UserError(f"{name}.input_shape: got {shape!r}; accepted: (C, H, W) or (D,), positive integers{see}")
    info = getattr(dm, "info", None)
    if not (callable(getattr(info, "as_dict", None)) and callable(getattr(info, "check_same", None))):
        raise UserError(f"{name}.info: got {type(info).__name__}; accepted: a lipvae.data.SplitInfo (the split's"
                        f" identity, recorded in results.json){see}")
    dim = math.prod(shape)
    for split in ("train", "val", "test"):
        try:
            part = dm.split(split)
        except Exception as e:
            raise UserError(f"{name}.split({split!r}) failed ({type(e).__name__}: {str(e)[:120]}){see}") from None
        for attr in ("images", "labels", "index"):
            if not isinstance(getattr(part, attr, None), torch.Tensor):
                raise UserError(f"{name}.split({split!r}).{attr}: not a tensor{see}")
        x = part.images
        if x.ndim != 2 or x.shape[1] != dim or not x.is_floating_point():
            raise UserError(f"{name}.split({split!r}).images: got a {x.dtype} tensor of shape {tuple(x.shape)};"
                            f" accepted: floats of shape (N, {dim}) (input_shape {tuple(shape)} flattened){see}")
        if len(x) == 0 or len(part.labels) != len(x) or len(part.index) != len(x):
            raise UserError(f"{name}.split({split!r}): {len(x)} images, {len(part.labels)} labels,"
                            f" {len(part.index)} indices; accepted: as many of each, at least one{see}")
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise UserError(f"{name}.split({split!r}).images: values outside [0, 1]; accepted: inputs scaled to"
                            f" [0, 1] (the decoder's sigmoid head and the likelihoods assume it){see}")


class ImageDataModule(VAEDataModule):
    """A grey-scale image data set in IDX files (MNIST, Fashion-MNIST: ``lipvae.catalog``),
    flattened to vectors in [0, 1].

    The official training split is divided ``1 − val_fraction`` / ``val_fraction``
    (seeded). With ``resplit`` (``true``; ``auto`` when the training split is
    missing) the official *test* split is divided into train/val/test instead, and
    ``info.split`` says so. ``limit`` keeps the first N images of each source file.
    ``index`` of a test image is its position in the official test file.
    """

    def __init__(
        self,
        name: str = "mnist",
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        resplit: bool | str = "auto",
        resplit_test_fraction: float = 0.2,
        limit: int | None = None,
        download: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed)  # checked by the data schema (lipvae.schema.ImageDataConfig)
        self.name, self.root, self.download = name, root, download
        self.val_fraction, self.resplit, self.test_fraction = val_fraction, resplit, resplit_test_fraction
        self.limit = limit
        self._folders: dict[str, str] = {}
        self._sources: dict[str, str] = {}

    def _source(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, folder = load_split(self.name, split, self.root, self.download)
        self._folders[split] = str(folder)
        if self.limit:
            images, labels = images[: self.limit], labels[: self.limit]
        self._sources[f"{self.name}/{split}"] = digest(images, labels)
        self._image_shape = (1, *images.shape[1:])
        x = torch.from_numpy(images.astype(np.float32) / 255.0).flatten(1)
        return x, torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        check_root(self.root)
        gen = torch.Generator().manual_seed(self.seed)
        resplit = self.resplit
        if resplit == "auto":
            resplit = find_split(self.name, "train", self.root) is None and (
                not self.download or _download(self.name, "train", self.root) is None
            )
        test_x, test_y = self._source("test")
        test_index = torch.arange(len(test_x))
        if resplit:
            perm = torch.randperm(len(test_x), generator=gen)
            n_test = max(1, int(round(self.test_fraction * len(test_x))))
            pool, held = perm[n_test:], perm[:n_test].sort().values
            train_x, train_y, train_index = test_x[pool], test_y[pool], test_index[pool]
            test_x, test_y, test_index = test_x[held], test_y[held], test_index[held]
        else:
            train_x, train_y = self._source("train")
            train_index = torch.arange(len(train_x))
        perm = torch.randperm(len(train_x), generator=gen)
        n_val = max(1, int(round(self.val_fraction * len(train_x))))
        val, train = perm[:n_val], perm[n_val:]
        if len(train) == 0 or len(test_x) == 0:  # found before training: a tiny data.limit
            need = 3 if resplit else 2
            raise UserError(
                f"data.limit: got {self.limit}, which leaves {len(train)} training and {len(test_x)} test images;"
                f" accepted: at least {need} images per source file, enough for non-empty train, val and test splits"
            )
        splits = {
            "train": TensorBatches(train_x[train], train_y[train], train_index[train]),
            "val": TensorBatches(train_x[val], train_y[val], train_index[val]),
            "test": TensorBatches(test_x, test_y, test_index),
        }
        folder = self._folders.get("test")
        train_folder = self._folders.get("train")
        info = SplitInfo(
            self.name,
            "resplit-test" if resplit else "official",
            len(train),
            len(val),
            len(test_x),
            folder,
            train_folder if train_folder not in (None, folder) else None,
            seed=self.seed,
            sources=dict(self._sources),
            indices=digest(*(splits[k].index for k in ("train", "val", "test"))),
        )
        self.set_splits(splits, info, self._image_shape)
