import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def has_mnist_test() -> bool:
    return (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()


needs_mnist = pytest.mark.skipif(not has_mnist_test(), reason="../shared/data/mnist not present")


def run_cli(*args: str, module: str = "lipvae.train", env: dict | None = None, cwd=None, timeout=300):
    """Run an entry point as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "LIPVAE_DATA_DIR": str(SHARED_DATA), "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or PROJECT,
        timeout=timeout,
    )
