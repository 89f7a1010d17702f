import gzip
import shutil
import json
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

import forked

PROJECT = Path(__file__).resolve().parents[1]
CONF = PROJECT / "conf"
# torch, Lightning and lipvae are imported where tests run (in pytest-xdist's workers), not here:
# the process that hands out the tests would spend ~10 s importing them for nothing.


@cache
def _test_process() -> None:
    import lipvae.schema  # noqa: F401  (registers the config schemas for in-process composition)
    import torch

    # the cores shared among pytest-xdist's workers (one per core under -n auto): one thread each then
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // workers)))

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


def every_kth_fast(cases: list, k: int, ids: list[str] | None = None) -> list:
    """Parameters for ``parametrize``: every ``k``-th case (a spread of the kinds) in the fast subset,
    the others marked slow (run by the full suite)."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), id=None if ids is None else ids[i],
                         marks=() if i % k == 0 else pytest.mark.slow) for i, c in enumerate(cases)]


def pytest_collection_modifyitems(config, items):
    # the long tests first (a stable sort: file order otherwise), so that pytest-xdist's workers
    # finish together instead of one of them starting the wheel's build as the other runs out of work
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
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
    import torch

    _test_process()
    torch.manual_seed(0)


@pytest.fixture
def synthetic_root() -> Path:
    """A folder holding ``mnist/`` with both splits of the synthetic digits."""
    return synthetic_data_dir()


def run_cli(*args: str, module: str = "lipvae.train", env: dict | None = None, cwd=None, process: bool = False,
            timeout=300, file_size: int | None = None):
    """Run an entry point as a user would, on the synthetic data; returns the CompletedProcess.
    In this process (``run_main``) unless ``process``: where a process is the thing under test
    (a process forked from a server that has the imports done: tests/forked.py). ``file_size``:
    the process's limit on the size of a file it writes (bytes)."""
    if not process:
        return run_main(*args, module=module, env=env, cwd=cwd)
    return forked.run(module, args, _process_env(env), cwd or PROJECT, timeout=timeout, file_size=file_size)


def start_cli(*args: str, module: str = "lipvae.train", env: dict | None = None) -> forked.Process:
    """``run_cli(..., process=True)`` without waiting: the process, to signal and wait for."""
    return forked.Process(module, args, _process_env(env), PROJECT)


def _process_env(env: dict | None) -> dict:
    return {**os.environ, **_cli_env(env)}


def _cli_env(env: dict | None) -> dict:
    """What a test's command runs with beside the environment: the synthetic data, W&B offline."""
    return {"LIPVAE_DATA_DIR": str(synthetic_data_dir()), "WANDB_MODE": "offline", **(env or {})}


def run_main(*args: str, module: str = "lipvae.train", env: dict | None = None, cwd=None):
    """Run an entry point's ``cli()``/``main()`` in this process, as ``run_cli`` does in a new one:
    same arguments, environment and working folder, and the same CompletedProcess back (exit
    status, stdout, stderr; an exception that escapes is a traceback on stderr and status 1).
    For the tests of what a command does, not of what a process does (signals, DDP, the wheel):
    it saves the ~8 s of importing torch and Lightning each time."""
    import contextlib
    import importlib
    import io
    import logging
    import signal
    import traceback

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    entry = importlib.import_module(module)
    entry = getattr(entry, "cli", None) or entry.main
    full_env = _cli_env(env)
    saved_env = {k: os.environ.get(k) for k in full_env}
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.update(full_env)
    sys.argv = [f"{module.replace('.', '/')}.py", *args]
    os.chdir(cwd or PROJECT)
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 (what a process would print before dying)
                traceback.print_exc()
                code = 1
    finally:
        if "wandb" in sys.modules:  # what a process's exit does (wandb's atexit hook): the W&B service
            sys.modules["wandb"].teardown()  # writes out its offline files and forgets this environment
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        for handler in root.handlers:  # the run's own (its train.log): closed, as a process's exit would
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


SMOKE = ["tier=smoke", "data.resplit=true", "trainer.enable_progress_bar=false"]


def composed(*overrides: str, hydra: bool = False, conf: Path = CONF):
    """The config the command line would compose from ``overrides`` (``conf``: the config folder;
    ``hydra``: with Hydra's own node). A copy of this process's one composition of them: a
    composition costs ~0.4 s, and many tests start from the same few."""
    import copy

    return copy.deepcopy(_composed(tuple(overrides), hydra, Path(conf)))


@cache
def _composed(overrides: tuple, hydra: bool, conf: Path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """A folder made once per test session by ``build(folder)`` and shared by the session's
    pytest-xdist workers: the first to ask builds it while the others wait, then all read it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's, either way
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            (shared / f"{name}.complete").touch()
    return folder


@pytest.fixture(scope="session")
def sweep(tmp_path_factory) -> Path:
    """A Lipschitz sweep ``enc_L=5,-1,7`` with W&B (offline): two runs, and a job that the
    validation refused (-1); beside them a killed and a half-written job, as a crash leaves them.
    ``command.json``: the command's exit status and output. Read only: shared by the session's workers."""

    def build(root: Path) -> None:
        proc = run_main(*SMOKE, "margins.attacked_inputs=6", "attack.starts=2", "attack.steps=10", "model=lipschitz",
                        "enc_L=5,-1,7", "logger=default", f"hydra.sweep.dir={root}", "-m", env={"WANDB_MODE": ""})
        assert proc.returncode in (0, 1), proc.stderr[-3000:]
        (root / "command.json").write_text(json.dumps(
            {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}))
        (root / "9_killed" / ".hydra").mkdir(parents=True)
        (root / "8_torn" / ".hydra").mkdir(parents=True)
        (root / "8_torn" / "results.json").write_text('{"schema_version": 1, "status": "compl')

    return shared_folder(tmp_path_factory, "sweep", build)


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> dict:
    """The test session's trained models, one smoke multirun shared by every test that reads a
    finished run (copy a folder before changing it): Lipschitz and standard VAEs, each with learned
    and with fixed σ, keyed by (model kind, σ mode)."""

    def build(root: Path) -> None:
        proc = run_main(*SMOKE, "model=lipschitz,standard", "model.encoder_std.mode=learned,fixed",
                        f"hydra.sweep.dir={root}", "-m")
        assert proc.returncode == 0, proc.stderr[-3000:]

    out = {}
    for results in shared_folder(tmp_path_factory, "smoke_runs", build).glob("*/results.json"):
        r = json.loads(results.read_text())
        out[(r["model"]["kind"], r["model"]["encoder_std"]["mode"])] = results.parent
    assert len(out) == 4
    return out
