import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch


from conftest import composed, needs_real_mnist
from lipvae.data import ImageDataModule, find_split, load_split, read_idx
from lipvae.errors import UserError


def write_idx(path, array, compress=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_dataset(root, n_train=50, n_test=30, compress=False):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if compress else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{stem}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(root / f"{stem}-labels-idx1-ubyte{ext}", np.arange(n) % 10, compress)
    return root


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, arr, compress)
    assert np.array_equal(read_idx(path), arr)


def test_corrupt_idx_is_one_clear_error(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="corrupt"):
        read_idx(path)
    path.write_bytes(b"garbage!")
    with pytest.raises(UserError, match="magic"):
        read_idx(path)


def test_root_resolution_order(tmp_path, monkeypatch):
    explicit = fake_dataset(tmp_path / "explicit")
    env = fake_dataset(tmp_path / "env" / "mnist", compress=True)
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(tmp_path / "env"))
    assert find_split("mnist", "train", str(explicit))[0].parent == explicit
    assert find_split("mnist", "train", None)[0].parent == env
    tv = fake_dataset(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert find_split("fashion_mnist", "test", str(tmp_path / "tv"))[0].parent == tv


def test_missing_dataset_names_places_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr("lipvae.data._beside_project", lambda: [tmp_path / "nowhere" / "project"])
    monkeypatch.setenv("LIPVAE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError) as err:
        load_split("mnist", "train", None, download=False)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "mnist") in msg and "data.resplit=true" in msg


def test_official_split_is_seeded_disjoint_and_limited(tmp_path):
    fake_dataset(tmp_path, n_train=100, n_test=40)
    dm = ImageDataModule(root=str(tmp_path), limit=80, seed=3)
    dm.setup()
    assert (dm.info.num_train, dm.info.num_val, dm.info.num_test) == (72, 8, 40)
    assert dm.info.split == "official"
    train, val = set(dm.split("train").index.tolist()), set(dm.split("val").index.tolist())
    assert not train & val and len(train | val) == 80
    x = dm.split("train").images
    assert x.shape[1] == 784 and x.min() >= 0 and x.max() <= 1
    again = ImageDataModule(root=str(tmp_path), limit=80, seed=3)
    assert torch.equal(again.split("val").index, dm.split("val").index)


def test_resplit_auto_uses_test_split_only_when_train_missing(tmp_path):
    root = fake_dataset(tmp_path, n_train=100, n_test=50)
    assert ImageDataModule(root=str(root), resplit="auto", download=False).split("test").index.numel() == 50
    for f in root.glob("train-*"):
        f.unlink()
    dm = ImageDataModule(root=str(root), resplit="auto", download=False)
    dm.setup()
    assert dm.info.split == "resplit-test" and dm.info.num_test == 10
    parts = [set(dm.split(s).index.tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 50 and len(set.union(*parts)) == 50


@needs_real_mnist
def test_real_mnist_test_split_resplit():
    dm = ImageDataModule(resplit=True)
    dm.setup()
    assert dm.info.split == "resplit-test"
    assert (dm.info.num_train, dm.info.num_val, dm.info.num_test) == (7200, 800, 2000)
    x, y, _ = dm.split("test")[[0, 1]]
    assert x.shape == (2, 784) and set(y.tolist()) <= set(range(10))


def test_data_schema_covers_every_argument_of_the_data_module():
    """The schema is where ImageDataModule's arguments are checked, so it must know them all."""
    import inspect

    from lipvae.schema import ImageDataConfig

    arguments = set(inspect.signature(ImageDataModule).parameters) - {"seed"}  # seed: the run's
    assert set(ImageDataConfig.model_fields) - {"target"} == arguments


@pytest.mark.slow
def test_data_group_builds_its_target_old_records_included():
    from omegaconf import OmegaConf

    from lipvae.build import build_datamodule
    from lipvae.config import validate

    cfg = composed("data.limit=50")
    dm = build_datamodule(cfg.data, seed=3)
    assert type(dm) is ImageDataModule and dm.seed == 3
    record = OmegaConf.create({k: v for k, v in cfg.data.items() if k != "_target_"})  # a run from before
    assert type(build_datamodule(record, seed=3)) is ImageDataModule
    # a class of one's own: its arguments are its own business, lipvae's data checks step aside
    cfg.data = OmegaConf.create({"_target_": f"{__name__}.PlainData", "name": "mine", "eval_batch_size": 10,
                                 "size": 4})
    validate(cfg)
    mine = build_datamodule(cfg.data, seed=5)
    assert isinstance(mine, PlainData) and (mine.size, mine.seed) == (4, 5)
    cfg.data.size = "many"
    with pytest.raises(UserError, match=r"^data: cannot build test_data.PlainData \(ValueError: size"):
        build_datamodule(cfg.data, seed=5)


class PlainData:
    def __init__(self, name: str, eval_batch_size: int, size: int, seed: int) -> None:
        if not isinstance(size, int):
            raise ValueError(f"size must be an integer, got {size!r}")
        self.size, self.seed = size, seed


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    """torchvision makes <root>/MNIST/raw/ before it fails to download; those empty folders were left."""
    import torchvision

    from lipvae.data import _download

    class Offline:
        def __init__(self, root, train, download):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True)
            raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("x")
    assert _download("mnist", "test", str(kept)) is None
    assert sorted(p.name for p in kept.rglob("*")) == ["notes.txt"]  # the user's folder is kept, MNIST/raw is gone
    monkeypatch.setenv("LIPVAE_CACHE_DIR", str(tmp_path / "cache"))
    assert _download("mnist", "test") is None
    assert not (tmp_path / "cache").exists()


def test_images_of_another_size_give_their_shape_to_the_model(tmp_path):
    """10x10 images in IDX files: the data module says so (input_shape), and the VAE is built for it."""
    from conftest import write_idx

    from lipvae.data import ImageDataModule, check_datamodule
    from lipvae.vae import VAE

    folder = tmp_path / "small"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.full((20, 10, 10), 7, dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(20, dtype=np.uint8))
    dm = ImageDataModule(root=str(folder), resplit=True, download=False)
    dm.setup()
    check_datamodule(dm)
    assert dm.input_shape == (1, 10, 10) and dm.split("test").images.shape[1] == 100
    assert dm.info.input_shape == [1, 10, 10]
    vae = VAE(input_shape=dm.input_shape, latent_dim=2, hidden=(8, 8), arch="conv", channels=(4,))
    assert vae.elbo(dm.split("train").images[:3])["elbo"].shape == (3,)
