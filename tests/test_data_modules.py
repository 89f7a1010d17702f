"""The data contract (lipvae.data.VAEDataModule) and the built-in data entries beyond the IDX
files: a tensor file, an image folder, any torchvision data set; README's own data module."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lipvae.data import SplitInfo, TensorBatches, VAEDataModule, check_datamodule
from lipvae.datamodules import ImageFolderDataModule, TensorFileDataModule, TorchvisionDataModule
from lipvae.errors import UserError

from conftest import PROJECT, run_cli, synthetic_digits


def _check_split(dm, shape, n_total, n_test_source=0):
    """Set up and checked; every input of the source(s) in exactly one split (a source's own test
    split of ``n_test_source`` inputs apart)."""
    dm.setup()
    check_datamodule(dm)
    assert dm.input_shape == shape and dm.info.input_shape == list(shape)
    parts = [dm.split(s) for s in ("train", "val", "test")]
    assert sum(len(p.images) for p in parts) == n_total
    pool = parts if not n_test_source else parts[:2]
    assert sorted(torch.cat([p.index for p in pool]).tolist()) == list(range(n_total - n_test_source))
    if n_test_source:
        assert sorted(parts[2].index.tolist()) == list(range(n_test_source))
    for p in parts:
        assert p.images.shape[1] == int(np.prod(shape)) and 0 <= float(p.images.min()) and float(p.images.max()) <= 1


def test_a_tensor_file_of_images_or_vectors_is_divided_with_the_seed(tmp_path):
    gen = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", gen.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8))
    dm = TensorFileDataModule(str(tmp_path / "images.npy"), seed=3)
    _check_split(dm, (3, 8, 8), 50)
    assert (dm.info.split, dm.info.num_test) == ("divided", 10)
    again = TensorFileDataModule(str(tmp_path / "images.npy"), seed=3)
    again.setup()
    assert again.info.indices == dm.info.indices and torch.equal(again.split("test").index, dm.split("test").index)
    other = TensorFileDataModule(str(tmp_path / "images.npy"), seed=4)
    other.setup()
    assert other.info.indices != dm.info.indices
    torch.save({"x": torch.rand(30, 7, dtype=torch.float64), "y": torch.arange(30)}, tmp_path / "vectors.pt")
    vectors = TensorFileDataModule(str(tmp_path / "vectors.pt"))
    _check_split(vectors, (7,), 30)
    assert set(torch.cat([vectors.split(s).labels for s in ("train", "val", "test")]).tolist()) == set(range(30))


def test_a_tensor_file_of_grey_or_channels_last_images_is_read_channels_first(tmp_path, caplog):
    """N × H × W arrays (Keras's MNIST) are grey-scale images; N × H × W × C ones (Keras's CIFAR)
    are transposed, not read as H channels of W × C images; the log says how each was read."""
    import logging

    gen = np.random.default_rng(3)
    grey, rgb = gen.integers(0, 256, (20, 8, 6), dtype=np.uint8), gen.integers(0, 256, (20, 8, 6, 3), dtype=np.uint8)
    for name, array, shape, as_nchw in (("grey", grey, (1, 8, 6), grey[:, None]),
                                        ("rgb", rgb, (3, 8, 6), rgb.transpose(0, 3, 1, 2))):
        np.save(tmp_path / f"{name}.npy", array)
        dm = TensorFileDataModule(str(tmp_path / f"{name}.npy"), val_fraction=0.25, test_fraction=0.25)
        with caplog.at_level(logging.INFO, logger="lipvae"):
            _check_split(dm, shape, 20)
        part = dm.split("train")
        assert torch.equal(part.images, torch.as_tensor(as_nchw[part.index.numpy()].reshape(len(part.index), -1)) / 255.0)
    assert "read (20, 8, 6) as N × H × W grey-scale images" in caplog.text
    assert "read (20, 8, 6, 3) as N × H × W × C images (channels last)" in caplog.text


def test_too_few_inputs_say_whether_the_limit_or_the_data_is_short(tmp_path):
    np.save(tmp_path / "two.npy", np.zeros((2, 1, 4, 4), dtype=np.uint8))
    with pytest.raises(UserError, match=r"^data: 2 inputs leave no training split after 1 test and 1 validation inputs;"
                       r" accepted: more inputs \(more in the data\), or smaller data\.test_fraction and"):
        TensorFileDataModule(str(tmp_path / "two.npy")).setup()
    np.save(tmp_path / "many.npy", np.zeros((20, 1, 4, 4), dtype=np.uint8))
    with pytest.raises(UserError, match=r"^data: 3 inputs leave no training split after 2 test and 1 validation inputs;"
                       r" accepted: more inputs \(data\.limit above 3\)"):
        TensorFileDataModule(str(tmp_path / "many.npy"), limit=3, val_fraction=0.5, test_fraction=0.5).setup()


def test_tensor_file_labels_are_class_ids_or_names(tmp_path):
    """Names are numbered in sorted order (as image folders' are), whole floats are ids, and
    fractional labels (regression targets) are one line instead of being truncated to ids."""
    x = np.random.default_rng(4).integers(0, 256, (12, 1, 4, 4), dtype=np.uint8)
    names = np.array(["dog", "cat", "owl"] * 4)
    for labels, ids in ((names, [1, 0, 2] * 4), (np.array([2.0, 0.0, 1.0] * 4), [2, 0, 1] * 4)):
        np.savez(tmp_path / "d.npz", x=x, y=labels)
        dm = TensorFileDataModule(str(tmp_path / "d.npz"), val_fraction=0.25, test_fraction=0.25)
        dm.setup()
        for split in ("train", "val", "test"):
            part = dm.split(split)
            assert part.labels.tolist() == [ids[i] for i in part.index.tolist()]
    np.savez(tmp_path / "d.npz", x=x, y=np.linspace(0, 1, 12))
    with pytest.raises(UserError, match=r"^data\.path \(d\.npz\): labels of float64 values that are not whole"
                       r" numbers; accepted: class ids \(integers\) or class names \(strings\)$"):
        TensorFileDataModule(str(tmp_path / "d.npz")).setup()


@pytest.mark.parametrize("content, message", [
    (np.full((10, 4), 2.0), r"float values outside \[0, 1\]"),
    (np.zeros((10, 1, 2, 2, 2)), r"shape \(10, 1, 2, 2, 2\); accepted: N × C × H × W"),
    (np.zeros((10, 4), dtype=np.int32), r"int32 values; accepted: uint8 or uint16"),
])
def test_a_tensor_file_that_is_not_inputs_is_one_line(tmp_path, content, message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(UserError, match=r"^data\.path \(bad\.npy\): .*" + message):
        TensorFileDataModule(str(tmp_path / "bad.npy")).setup()
    with pytest.raises(UserError, match=r"^data\.path: got .*missing.npy.*not a file"):
        TensorFileDataModule(str(tmp_path / "missing.npy"))


def test_a_changed_file_is_caught_by_the_recorded_digests(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "d.npy", x)
    dm = TensorFileDataModule(str(tmp_path / "d.npy"))
    dm.setup()
    record = dm.info.as_dict()
    x[7, 0, 1, 1] ^= 1
    np.save(tmp_path / "d.npy", x)
    changed = TensorFileDataModule(str(tmp_path / "d.npy"))
    changed.setup()
    with pytest.raises(UserError, match=r"tensor_file/train file that differs"):
        changed.info.check_same(record, tmp_path)


def test_an_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    gen = np.random.default_rng(2)
    for label in ("cats", "dogs"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(gen.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / label / f"{i}.png")
    rgb = ImageFolderDataModule(str(tmp_path / "img"), channels=3)
    _check_split(rgb, (3, 8, 12), 12)
    assert sorted(torch.cat([rgb.split(s).labels for s in ("train", "val", "test")]).tolist()) == [0] * 6 + [1] * 6
    grey = ImageFolderDataModule(str(tmp_path / "img"), channels=1)
    _check_split(grey, (1, 8, 12), 12)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "img" / "dogs" / "odd.png")
    with pytest.raises(UserError, match=r"^data\.root: .* holds images of 2 sizes"):
        ImageFolderDataModule(str(tmp_path / "img")).setup()


def _bilinear(image: np.ndarray, size) -> np.ndarray:
    """An independent resize (torch's anti-aliased bilinear interpolation, made to match PIL's) of
    one ``C × H × W`` uint8 image, in [0, 1]."""
    t = torch.as_tensor(image, dtype=torch.float64)[None] / 255
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0].numpy()


def test_images_of_several_sizes_are_resized_to_data_size(tmp_path):
    from PIL import Image

    gen = np.random.default_rng(5)
    originals = {}
    for i, (h, w) in enumerate([(20, 24), (9, 13), (16, 16), (31, 17)]):
        originals[i] = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(originals[i]).save(tmp_path / f"{i}.png")
    with pytest.raises(UserError, match=r"holds images of 4 sizes .*; accepted: images of one size, or data\.size="):
        ImageFolderDataModule(str(tmp_path), channels=3).setup()
    dm = ImageFolderDataModule(str(tmp_path), channels=3, size=[16, 12], val_fraction=0.25, test_fraction=0.25)
    _check_split(dm, (3, 16, 12), 4)
    for split in ("train", "val", "test"):
        part = dm.split(split)
        for image, index in zip(part.images, part.index):
            expected = _bilinear(originals[int(index)].transpose(2, 0, 1), (16, 12))
            assert np.abs(image.view(3, 16, 12).numpy() - expected).max() <= 2.5 / 255  # rounding to uint8 apart
    again = ImageFolderDataModule(str(tmp_path), channels=3, size=[16, 12], val_fraction=0.25, test_fraction=0.25)
    again.setup()
    assert again.info.sources == dm.info.sources  # the same pixels: a re-evaluation finds its inputs
    square = ImageFolderDataModule(str(tmp_path), channels=1, size=16, val_fraction=0.25, test_fraction=0.25)
    _check_split(square, (1, 16, 16), 4)
    same = [p for p in ("train", "val", "test") if 2 in square.split(p).index.tolist()][0]
    row = square.split(same).index.tolist().index(2)  # the 16 × 16 image is read unchanged
    expected = np.asarray(Image.fromarray(originals[2]).convert("L"), dtype=np.float32) / 255
    assert np.array_equal(square.split(same).images[row].view(16, 16).numpy(), expected)


@pytest.mark.parametrize("size", [0, -3, [16], [16, 0], "big", [16, 2.5], True])
def test_a_size_that_is_not_one_is_one_line(tmp_path, size):
    with pytest.raises(UserError, match=r"^data\.size: got .*; accepted: null \(the images' own size\), a positive"
                       r" integer \(a square\) or \[height, width\]$"):
        ImageFolderDataModule(str(tmp_path), size=size)
    with pytest.raises(UserError, match=r"^data\.size: got"):
        TorchvisionDataModule("MNIST", str(tmp_path), size=size)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """A folder of 16-bit grey-scale PNGs (microscopy, medical imaging) is read as value / 65,535:
    PIL's conversion to 8 bits would clip every value above 255 to white. 32-bit pixels of unknown
    range, and a folder mixing bit depths, are one line; a uint16 tensor file is scaled alike."""
    from PIL import Image

    gen = np.random.default_rng(7)
    deep = {i: gen.integers(0, 65536, (6, 5), dtype=np.uint16) for i in range(6)}
    for i, a in deep.items():
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode == "I;16"
    for channels in (1, 3):
        dm = ImageFolderDataModule(str(tmp_path), channels=channels, val_fraction=0.2, test_fraction=0.2)
        _check_split(dm, (channels, 6, 5), 6)
        for split in ("train", "val", "test"):
            part = dm.split(split)
            for image, index in zip(part.images, part.index):
                expected = np.repeat(deep[int(index)][None].astype(np.float64) / 65535, channels, axis=0)
                assert np.abs(image.view(channels, 6, 5).numpy() - expected).max() < 1e-6
    np.save(tmp_path / "deep.npy", np.stack(list(deep.values()))[:, None])
    vectors = TensorFileDataModule(str(tmp_path / "deep.npy"))
    vectors.setup()
    assert float(vectors.split("train").images.max()) <= 1 and float(vectors.split("train").images.max()) > 0.5
    Image.fromarray(np.full((6, 5), 200, dtype=np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(UserError, match=r"^data\.root: .* holds images of uint16 and uint8 pixels; accepted: one bit"):
        ImageFolderDataModule(str(tmp_path)).setup()
    (tmp_path / "eight.png").unlink()
    Image.fromarray(np.full((6, 5), 70000, dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(UserError, match=r"^data\.root: .*wide\.tif holds 32-bit pixels \(PIL mode I\) of unknown range"):
        ImageFolderDataModule(str(tmp_path)).setup()


def test_a_torchvision_data_set_by_class_name(tmp_path, monkeypatch):
    """torchvision's MNIST class reading IDX files placed in its raw/ layout, offline."""
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, seed in (("train", 30, 1), ("t10k", 12, 2)):
        images, labels = synthetic_digits(n, seed)
        for name, a in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            (raw / name).write_bytes(struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
                                     + a.tobytes())
    dm = TorchvisionDataModule("MNIST", str(tmp_path), download=False)
    _check_split(dm, (1, 28, 28), 42, n_test_source=12)
    assert dm.info.split == "train-test" and dm.info.num_test == 12
    assert set(dm.info.sources) == {"torchvision/MNIST/train", "torchvision/MNIST/test"}
    small = TorchvisionDataModule("MNIST", str(tmp_path), download=False, size=[14, 10])
    _check_split(small, (1, 14, 10), 42, n_test_source=12)
    train = synthetic_digits(30, 1)[0]
    part = small.split("val")
    for image, index in zip(part.images, part.index):
        expected = _bilinear(train[int(index)][None], (14, 10))
        assert np.abs(image.view(1, 14, 10).numpy() - expected).max() <= 2.5 / 255
    with pytest.raises(UserError, match=r"^data\.dataset: got 'NoSuchSet'; accepted: a class of torchvision\.datasets"):
        TorchvisionDataModule("NoSuchSet", str(tmp_path))
    with pytest.raises(UserError, match=r"^data: torchvision's FashionMNIST cannot be read from .*; put its files there"
                       r" or allow data\.download$"):
        TorchvisionDataModule("FashionMNIST", str(tmp_path), download=False).setup()
    import torchvision
    from urllib.error import URLError

    class Offline(torchvision.datasets.FashionMNIST):  # a download on a machine without network
        def __init__(self, *args, **kwargs):
            raise URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(UserError, match=r"^data: torchvision's Offline cannot be read from .*URLError.*; put its files"
                       r" there \(the download failed\)$"):
        TorchvisionDataModule("FashionMNIST", str(tmp_path), download=True).setup()


class _NoShape(VAEDataModule):
    def setup(self, stage=None):
        x = torch.rand(9, 4)
        part = TensorBatches(x, torch.zeros(9, dtype=torch.int64), torch.arange(9))
        self._splits = {"train": part, "val": part, "test": part}
        self.info = SplitInfo("x", "generated", 9, 9, 9)


class _OutOfRange(_NoShape):
    def setup(self, stage=None):
        part = TensorBatches(torch.full((9, 4), 3.0), torch.zeros(9, dtype=torch.int64), torch.arange(9))
        self.set_splits({"train": part, "val": part, "test": part}, SplitInfo("x", "generated", 9, 9, 9), (4,))


class _NotAModule:
    pass


@pytest.mark.parametrize("dm, message", [
    (_NoShape(), r"\.input_shape: got None; accepted: \(C, H, W\) or \(D,\)"),
    (_OutOfRange(), r"\.split\('train'\)\.images: values outside \[0, 1\]"),
    (_NotAModule(), r"is not a LightningDataModule"),
])
def test_a_data_module_that_misses_the_contract_is_one_line(dm, message):
    if hasattr(dm, "setup"):
        dm.setup()
    with pytest.raises(UserError, match=r"^data: .*" + message + r".*docs/extending.md, 'Your own data'"):
        check_datamodule(dm)


def _readme_example(tmp_path: Path) -> tuple[Path, list[str]]:
    """README's own data module, its YAML and the overrides of its command, written as a user would."""
    readme = (PROJECT / "docs" / "extending.md").read_text()
    section = readme[readme.index("<!-- own-data-example"):]
    code, yaml = re.findall(r"```(?:python|yaml)\n(.*?)```", section, flags=re.S)[:2]
    command = re.search(r"```bash\n(PYTHONPATH=\. python -m lipvae\.train [^\n]*)\n```", section).group(1)
    (tmp_path / "my_data.py").write_text(code)
    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "blobs.yaml").write_text(yaml)
    return tmp_path, command.split()[4:]


@pytest.mark.slow
def test_readmes_own_data_module_trains_certifies_and_attacks(tmp_path, monkeypatch):
    folder, args = _readme_example(tmp_path)
    assert args[:3] == ["--config-dir", "my_conf", "data=blobs"] and "model/arch=conv" in args
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("my_data", None)
    proc = run_cli(*args, "tier=smoke", "margins.attacked_inputs=3", f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((folder / "run" / "results.json").read_text())
    assert r["status"] == "completed" and r["data"]["name"] == "blobs" and r["data"]["input_shape"] == [1, 12, 12]
    assert r["model"]["arch"] == "conv" and r["soundness_violations"] == 0
    assert r["certified"]["fraction_certified"] > 0
    # the smoke preset's data.limit is a field of lipvae's own data modules: left out for Blobs
    assert re.search(r"data: limit not argument\(s\) of my_data\.Blobs; left out",
                     (folder / "run" / "train.log").read_text())


@pytest.mark.slow
def test_a_data_module_that_misses_the_contract_stops_before_training(tmp_path, monkeypatch):
    (tmp_path / "bad_data.py").write_text(
        "import torch\nfrom lipvae.data import SplitInfo, TensorBatches, VAEDataModule\n\n\n"
        "class NoInfo(VAEDataModule):\n"
        "    def setup(self, stage=None):\n"
        "        part = TensorBatches(torch.rand(9, 4), torch.zeros(9, dtype=torch.int64), torch.arange(9))\n"
        "        self._splits, self._shape = {'train': part, 'val': part, 'test': part}, (4,)\n")
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "noinfo.yaml").write_text("_target_: bad_data.NoInfo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    proc = run_cli("--config-dir", str(tmp_path / "conf"), "data=noinfo", "tier=smoke",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data: bad_data.NoInfo.info: got NoneType;")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("arch, shape", [("mlp", (40,)), ("conv", (1, 6, 6))])
def test_no_radius_reconstructions_cannot_exceed_is_accepted(arch, shape):
    """Reconstructions lie in [0, 1]^D (checked here on decoders of both kinds at latents far out,
    where their sigmoid heads saturate), so none are √D or more apart: an r that large is refused,
    for the certificates of a Lipschitz VAE and for the attack of either kind; smaller r pass."""
    from omegaconf import OmegaConf

    from lipvae.evaluation import check_radii
    from lipvae.vae import VAE

    torch.manual_seed(0)
    vae = VAE(input_shape=shape, latent_dim=3, hidden=(8, 8), arch=arch, channels=(4,), kernel_size=3)
    out = vae.decode(100 * torch.randn(500, 3)).detach()
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    top = float(np.prod(shape)) ** 0.5  # √36 = 6 for the conv case, √40 for the mlp one
    assert float(torch.cdist(out, out).max()) < top
    cfg = OmegaConf.create({"certify": {"r": [1.0, top]}, "attack": {"r": 2.0},
                            "margins": {"certify": True, "attack": True}})
    with pytest.raises(UserError, match=rf"^certify\.r: got {re.escape(str([1.0, top]))}; accepted: radii below √D = {top:.4g}"):
        check_radii(cfg, shape, lipschitz=True)
    check_radii(cfg, shape, lipschitz=False)  # a standard VAE has no certificates
    cfg.certify.r, cfg.attack.r = [top - 0.01], top + 1
    with pytest.raises(UserError, match=r"^attack\.r: got .*; accepted: radii below"):
        check_radii(cfg, shape, lipschitz=False)
    cfg.attack.r = top - 0.01
    check_radii(cfg, shape, lipschitz=True)


@pytest.mark.slow
def test_a_radius_too_large_for_the_data_stops_before_training(tmp_path):
    np.save(tmp_path / "vectors.npy", (np.random.default_rng(0).random((120, 40)) < 0.3).astype(np.float32))
    proc = run_cli("data=tensor_file", f"data.path={tmp_path / 'vectors.npy'}", "tier=smoke",
                   f"hydra.run.dir={tmp_path / 'run'}")  # certify.r=[8] by default, and √40 < 6.4
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: certify.r: got [8.0]; accepted: radii below √D = 6.325, the"
                                                    " farthest two reconstructions of these inputs (D = 40 values in"
                                                    " [0, 1]) can be apart")
    assert not (tmp_path / "run" / "checkpoints").exists()


def _tensor_file_example(tmp_path: Path) -> list[str]:
    """README's tensor-file example: its script run in ``tmp_path``, its command's overrides."""
    readme = (PROJECT / "docs" / "extending.md").read_text()
    section = readme[readme.index("<!-- tensor-file-example"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    command = re.search(r"```bash\n(python -m lipvae\.train [^\n]*)\n```", section).group(1)
    import contextlib

    with contextlib.chdir(tmp_path):
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "my_images.npy").is_file()
    return [a.replace("my_images.npy", str(tmp_path / "my_images.npy")) for a in command.split()[3:]]


def _entry(name: str, tmp_path: Path, synthetic_root: Path) -> list[str]:
    """Overrides that point each built-in data entry at small local data."""
    if name == "tensor_file":
        return _tensor_file_example(tmp_path)
    if name == "mnist":  # found through LIPVAE_DATA_DIR, as the tests' other runs find it
        return ["data=mnist"]
    if name == "fashion_mnist":  # the IDX reader on any folder of the four files
        return ["data=fashion_mnist", f"data.root={synthetic_root / 'mnist'}", "data.download=false"]
    if name == "torchvision":
        raw = tmp_path / "MNIST" / "raw"
        raw.mkdir(parents=True)
        import gzip

        for f in (synthetic_root / "mnist").glob("*.gz"):
            (raw / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
        return ["data=torchvision", "data.dataset=MNIST", f"data.root={tmp_path}", "data.download=false"]
    from PIL import Image

    gen = np.random.default_rng(0)
    for i in range(120):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = np.zeros((12, 12, 3), dtype=np.uint8)
        r, c = gen.integers(0, 8, 2)
        image[r:r + 4, c:c + 4, i % 3] = 255
        Image.fromarray(image).save(folder / f"{i}.png")
    return ["data=image_folder", f"data.root={tmp_path / 'images'}", "data.channels=3"]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["mnist", "fashion_mnist", "torchvision", "image_folder", "tensor_file"])
def test_every_built_in_data_entry_trains_a_conv_vae_with_sound_certificates(entry, tmp_path, synthetic_root):
    args = _entry(entry, tmp_path, synthetic_root)
    if "model/arch=conv" not in args:
        args += ["model/arch=conv", "model.arch.channels=[4,8]"]
    proc = run_cli(*args, "tier=smoke", "data.limit=400", "margins.attacked_inputs=3",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["status"] == "completed" and r["model"]["arch"] == "conv" and r["soundness_violations"] == 0
    assert r["certified"]["fraction_certified"] > 0 and len(r["data"]["input_shape"]) == 3
    assert r["lipschitz"]["measured"]["encoder_mean"] <= r["lipschitz"]["nominal"]["encoder_mean"] * (1 + 1e-5)
