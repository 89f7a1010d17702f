import gzip
import os
import socket
import struct
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import lipvae.schema  # noqa: F401  (registers the config schemas for in-process composition)
import torch

PROJECT = Path(__file__).resolve().parents[1]
CONF = PROJECT / "src" / "lipvae" / "conf"

torch.set_num_threads(2)

# Seven-segment digits (segments a..g as line segments in a unit box, y downwards): each
# synthetic image is one of them, jittered, shifted and drawn with a soft stroke, so the
# classes differ the way handwritten digits do (shape, not intensity).
_SEGMENTS = {
    "a": ((0.2, 0.1), (0.8, 0.1)),
    "b": ((0.8, 0.1), (0.8, 0.5)),
    "c": ((0.8, 0.5), (0.8, 0.9)),
    "d": ((0.2, 0.9), (0.8, 0.9)),
    "e": ((0.2, 0.5), (0.2, 0.9)),
    "f": ((0.2, 0.1), (0.2, 0.5)),
    "g": ((0.2, 0.5), (0.8, 0.5)),
}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abfgcd"]


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28×28 uint8 digit-like images and their labels, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    images = np.zeros((n, 28, 28))
    for i, k in enumerate(labels):
        scale = rng.uniform(14, 20)
        off = rng.uniform(3, 25 - scale, size=2)
        slant = rng.uniform(-0.25, 0.25)
        width = rng.uniform(1.0, 2.0)
        for seg in _DIGITS[k]:
            p, q = (np.array(pt) + rng.normal(0, 0.03, 2) for pt in _SEGMENTS[seg])
            # to pixels: x = off_x + scale·(u + slant·(1 − v)), y = off_y + scale·v
            p = np.array([off[0] + scale * (p[0] + slant * (1 - p[1])), off[1] + scale * p[1]])
            q = np.array([off[0] + scale * (q[0] + slant * (1 - q[1])), off[1] + scale * q[1]])
            d = q - p
            t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
            dist = np.hypot(xx - p[0] - t * d[0], yy - p[1] - t * d[1])
            images[i] = np.maximum(images[i], np.clip(width + 0.5 - dist, 0, 1))
    images = np.clip(images + rng.normal(0, 0.02, images.shape), 0, 1)
    return (images * 255).round().astype(np.uint8), labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_synthetic_mnist(root: Path, num_train: int = 1200, num_test: int = 1000) -> Path:
    """Both MNIST splits, as IDX files under ``root/mnist`` (LIPVAE_DATA_DIR layout)."""
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", num_train, 1), ("t10k", num_test, 2)):
        images, labels = synthetic_digits(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@cache
def synthetic_data_dir() -> Path:
    """One synthetic data set per test session (its folder is removed at the end)."""
    return make_synthetic_mnist(Path(tempfile.mkdtemp(prefix="lipvae-synthetic-")))


def pytest_sessionfinish(session, exitstatus):
    if synthetic_data_dir.cache_info().currsize:
        import shutil

        shutil.rmtree(synthetic_data_dir(), ignore_errors=True)


@cache
def real_mnist() -> tuple[bool, str]:
    """Whether the real MNIST test split is found by lipvae's own search (data.root unset:
    LIPVAE_DATA_DIR, system folders, shared/data beside the project, the download cache),
    then by a download; and where it looked when not."""
    from lipvae.data import _download, candidate_dirs, find_split

    if find_split("mnist", "test", None) is not None:
        return True, ""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        if _download("mnist", "test") is not None:
            return True, ""
    finally:
        socket.setdefaulttimeout(old)
    places = ", ".join(dict.fromkeys(str(p) for p in candidate_dirs("mnist", None)[::3]))
    return False, f"real MNIST not found (looked in {places}; download failed)"


class _Lazy:
    """``@needs_real_mnist`` without searching (or downloading) at import time."""

    def __call__(self, fn):
        return pytest.mark.real_mnist(fn)


needs_real_mnist = _Lazy()


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("real_mnist") for item in items):
        found, why = real_mnist()
        if not found:
            for item in items:
                if item.get_closest_marker("real_mnist"):
                    item.add_marker(pytest.mark.skip(reason=why))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_mnist: needs the real MNIST test split (skipped when not found)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def synthetic_root() -> Path:
    """A folder holding ``mnist/`` with both splits of the synthetic digits."""
    return synthetic_data_dir()


def run_cli(*args: str, module: str = "lipvae.train", env: dict | None = None, cwd=None, timeout=300):
    """Run an entry point as a user would, on the synthetic data; returns the CompletedProcess."""
    full_env = {
        **os.environ,
        "LIPVAE_DATA_DIR": str(synthetic_data_dir()),
        "WANDB_MODE": "offline",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or PROJECT,
        timeout=timeout,
    )
