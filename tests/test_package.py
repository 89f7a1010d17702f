"""lipvae as a package: installed from its wheel, configs inside it, docs inside the
repository, float64 work on the CPU, output files readable by others."""

import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
import pytest
import torch
from torch import nn

from conftest import CONF, PROJECT, run_cli, synthetic_data_dir
from lipvae.certify.certificates import encoder_std_norms
from lipvae.data import ImageDataModule, check_root
from lipvae.errors import UserError
from lipvae.networks import polar_factor, spectral_norm_exact
from lipvae.results import Results, write_table
from lipvae.vae import Posterior


def test_configs_ship_inside_the_package():
    conf = resources.files("lipvae.conf")
    assert conf.joinpath("config.yaml").is_file()
    groups = {p.name for p in Path(str(conf)).iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert {"data", "model", "trainer", "logger", "certify", "attack", "experiment", "variant", "hydra"} <= groups
    assert Path(str(conf)).resolve() == CONF.resolve()


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    """Build the wheel, install it (not editable) into a fresh venv that borrows this
    environment's dependencies, and run the smoke preset from a folder outside the repo."""
    src = tmp_path / "src_copy"
    shutil.copytree(
        PROJECT, src, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "*.egg-info", "__pycache__", "build")
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("lipvae-*.whl"))
    with zipfile.ZipFile(wheel) as zf:  # conf/ of the repository ships as lipvae/conf
        names = set(zf.namelist())
    assert {"lipvae/conf/config.yaml", "lipvae/conf/__init__.py", "lipvae/conf/model/layer/stiefel.yaml"} <= names
    assert not any(n.startswith("conf/") for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # this pip installs
    child = venv / "bin" / "python"
    child_site = subprocess.run(
        [str(child), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # torch & co. come from this environment, appended after the venv's own site-packages
    Path(child_site, "_borrowed_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(child), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "LIPVAE_DATA_DIR": str(synthetic_data_dir()), "PYTHONPATH": ""}
    where = subprocess.run(
        [str(child), "-c", "import lipvae; print(lipvae.__file__)"], cwd=elsewhere, env=env,
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    # one training run: the packaged smoke tier, through a tier of the user's own config folder
    # (searched too: selectable by name) that changes only the seed
    mine = tmp_path / "my_conf" / "tier"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\n  - _self_\nseed: 7\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(venv / "bin" / "lipvae-train"), "--config-dir", str(tmp_path / "my_conf"), "tier=mine",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["soundness_violations"] == 0
    assert results["config"]["seed"] == 7 and results["config"]["data"]["limit"] == 600  # mine, on smoke
    assert results["estimated"]["num_inputs"] == 5
    assert results["data"]["folder"] == str((synthetic_data_dir() / "mnist").resolve())
    report = subprocess.run([str(venv / "bin" / "lipvae-report"), str(run_dir)], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert report.returncode == 0 and (run_dir / "report.html").is_file(), report.stderr
    usage = subprocess.run([str(venv / "bin" / "lipvae-certify")], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "design" in usage.stderr


class NoFloat64Tensor(torch.Tensor):
    """Behaves like a tensor on Apple's MPS backend: any float64 result raises, and only a
    move to the CPU gives back an ordinary tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        to_cpu = func is torch.Tensor.cpu or (
            func is torch.Tensor.to
            and any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")) if a is not None)
        )
        if to_cpu:
            return out.as_subclass(torch.Tensor)
        if isinstance(out, torch.Tensor):
            if out.dtype == torch.float64:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype")
            return out.as_subclass(cls)
        return out


def test_float64_work_happens_on_the_cpu():
    w = torch.randn(6, 4).as_subclass(NoFloat64Tensor)
    with pytest.raises(TypeError, match="float64"):
        w.double()  # the stand-in does refuse float64, as MPS does
    plain = w.as_subclass(torch.Tensor)
    assert spectral_norm_exact(w) == pytest.approx(float(torch.linalg.matrix_norm(plain.double(), ord=2)), rel=1e-12)
    polar = polar_factor(w)
    assert polar.dtype == torch.float32
    assert torch.allclose(polar.as_subclass(torch.Tensor).T @ polar.as_subclass(torch.Tensor), torch.eye(4), atol=1e-5)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def encode(self, x):
            std = torch.sigmoid(x[:, :3]).as_subclass(NoFloat64Tensor)
            return Posterior(std, std, std.log())

    x = torch.randn(10, 5)
    s, s_inf, s4 = encoder_std_norms(Encoder(), x, batch_size=4)
    expected = torch.sigmoid(x[:, :3]).double()
    assert s.dtype == np.float64
    assert np.allclose(s, expected.norm(dim=1).numpy()) and np.allclose(s_inf, expected.amax(dim=1).numpy())
    assert np.allclose(s4, (expected**4).sum(dim=1).pow(0.25).numpy())


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_output_files_respect_the_umask(tmp_path, umask, mode):
    import pandas as pd

    old = os.umask(umask)
    try:
        Results.from_dict({"status": "completed"}).write(tmp_path)
        write_table(tmp_path / "t.csv", pd.DataFrame({"a": [1]}))
    finally:
        os.umask(old)
    for name in ("results.json", "t.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode


def test_data_root_is_used_or_refused_never_bypassed(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))  # data exists elsewhere
    for root, what in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is not a folder")):
        if what == "is not a folder":
            root.write_text("x")
        with pytest.raises(UserError) as err:
            check_root(str(root))
        assert str(err.value).startswith(f"data.root: got '{root}', which {what}")
        with pytest.raises(UserError, match="data.root"):
            ImageDataModule(root=str(root), download=False).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        ImageDataModule(root=str(empty), download=False).setup()
    assert str(empty) in str(err.value) and str(synthetic_root) not in str(err.value)
    dm = ImageDataModule(root=str(synthetic_root / "mnist"), download=False)
    dm.setup()
    assert dm.info.folder == str((synthetic_root / "mnist").resolve()) and dm.info.split == "official"


def test_docs_link_only_inside_the_repository():
    docs = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md")), PROJECT / "sweeps" / "README.md"]
    assert {"math.md", "results.md", "reproduction.md"} <= {d.name for d in docs}
    sources = [*docs, *sorted((PROJECT / "src").rglob("*.py")), *sorted((PROJECT / "src").rglob("*.yaml"))]
    for path in sources:
        text = path.read_text()
        assert "../shared" not in text and "shared/docs" not in text, path
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target) or path.suffix != ".md":
                continue
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_a_config_dir_adds_new_names_and_does_not_replace_packaged_files(tmp_path):
    """Hydra searches lipvae's packaged configs before --config-dir, so a user's file named like a
    packaged one is not used; a new name is (README, "Installing into your own environment")."""
    model = tmp_path / "my_conf" / "model"
    model.mkdir(parents=True)
    body = "defaults:\n  - lipschitz\n  - _self_\nlatent_dim: 3\n"
    (model / "lipschitz.yaml").write_text(body)
    (model / "mine.yaml").write_text(body)

    def latent_dim(*args):
        proc = run_cli("--config-dir", str(tmp_path / "my_conf"), *args, "--cfg", "job")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return OmegaConf.create(proc.stdout).model.latent_dim

    assert latent_dim() == 10  # the packaged model/lipschitz.yaml
    assert latent_dim("model=mine") == 3
    (model / "broken.yaml").write_text("latent_dim: [3\n")  # a malformed file: one line naming it
    proc = run_cli("--config-dir", str(tmp_path / "my_conf"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: config: {model / 'broken.yaml'} is not valid YAML (line 2, column 1: expected ',' or ']', but got"
        " '<stream end>')"]
