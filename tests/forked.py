"""Entry points run as processes of their own, for the tests where a process is the thing under
test (signals, a full disk, DDP): each is forked from one server per test worker that imported
torch, Lightning and lipvae's modules once (multiprocessing's forkserver), so it has its own pid,
signal handlers, file-size limit, output and exit status, as ``python -m lipvae.train`` has, without
paying the ~10 s of those imports every time. (The wheel test still starts a new interpreter: there
the installed package is what is tested.)"""

from __future__ import annotations

import ast
import atexit
import importlib.util
import multiprocessing
import os
import resource
import runpy
import shutil
import subprocess
import sys
import tempfile
import traceback
import weakref
from pathlib import Path

_CONTEXT = None


def _imports_of(module: str) -> list[str]:
    """The modules ``module``'s own top level imports (read from its source, not run)."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            names.append(node.module)
    return names


def _context(module: str):
    """The forkserver, started on first use with what ``module`` imports (``module`` itself is
    run afresh as ``__main__`` in each process, as ``python -m`` runs it)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["forked", *_imports_of(module)])
    return _CONTEXT


def _main(module: str, args: list, env: dict, cwd: str, out: str, err: str, file_size: int | None) -> None:
    """The forked process: ``python -m <module> <args>`` with this environment, folder and output."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if file_size is not None:  # writes beyond it fail with EFBIG, as writes to a full disk fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 (what the interpreter prints before it dies)
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what an interpreter's exit runs (the W&B service's teardown, say)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Process:
    """The part of ``subprocess.Popen`` the tests use: pid, poll, send_signal, wait, communicate."""

    def __init__(self, module: str, args, env: dict, cwd, file_size: int | None = None):
        folder = Path(tempfile.mkdtemp(prefix="lipvae-process-"))
        weakref.finalize(self, shutil.rmtree, folder, True)  # the output files go with this object
        self._out, self._err = folder / "stdout", folder / "stderr"
        self.args = [module, *args]
        self._proc = _context(module).Process(
            target=_main, args=(module, [str(a) for a in args], dict(env), str(cwd), str(self._out),
                                str(self._err), file_size))
        self._proc.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self._proc.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._out.read_text(errors="replace"), self._err.read_text(errors="replace")

    def kill(self) -> None:
        self._proc.kill()


def run(module: str, args, env: dict, cwd, timeout: float | None = None,
        file_size: int | None = None) -> subprocess.CompletedProcess:
    """As ``subprocess.run(..., capture_output=True, text=True)``."""
    proc = Process(module, args, env, cwd, file_size)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

