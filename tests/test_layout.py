"""The package's layering: data flows one way, and nothing low imports anything high."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lipvae"

#: each layer may import only from itself and the layers before it
LAYERS = [
    {"errors", "safety", "catalog", "results", "plots", "networks", "conv", "data", "datamodules",
     "certify.bounds", "logs", "lightning", "lightning.loggers", "paired"},
    {"vae", "certify.coupled", "certify.certificates", "certify.tightness"},
    {"attack", "attack.base", "attack.pgd", "attack.lbfgs", "attack.latent", "lightning.module", "lightning.callbacks"},
    {"schema", "runfolder", "build"},
    {"config"},
    {"compose"},
    {"stored"},
    {"evaluation", "lightning.margins"},
    {"training", "report", "sweep"},
    {"train", "evaluate", "certify.__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The lipvae modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lipvae"):
            found.add(node.module.removeprefix("lipvae").lstrip("."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("lipvae.") for a in node.names if a.name.startswith("lipvae."))
    return found - {""}


def _level(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"lipvae.{name} is in no layer of tests/test_layout.py: place it")


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts
                 and _module_name(p) not in ("", "certify"))


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_no_module_imports_a_higher_layer(path):
    name = _module_name(path)
    for imported in _imports(path):
        assert _level(imported) <= _level(name), f"lipvae.{name} imports the higher lipvae.{imported}"


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_functions_stay_short():
    """A function reads on one screen: at most 80 lines anywhere in src/, 60 in train.py (whose
    functions are the steps of a run)."""
    too_long = [f"{p.relative_to(PACKAGE)}:{name} ({n} lines)" for p in PACKAGE.rglob("*.py")
                for name, n in _function_lengths(p) if n > (60 if p.name == "train.py" else 80)]
    assert not too_long, too_long


def _lightning_classes():
    """Every class lipvae defines with a Lightning class among its bases."""
    import importlib
    import inspect

    for path in MODULES:
        module = importlib.import_module(f"lipvae.{_module_name(path)}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and any(
                    base.__module__.startswith("lightning") for base in cls.__mro__[1:]):
                yield cls


def test_no_underscored_lightning_method_is_overridden_or_called():
    """Lightning's private methods change between releases (2.6 changed ModelCheckpoint's last.ckpt):
    lipvae's callbacks, loggers and modules override public hooks only."""
    import inspect
    import textwrap

    found = list(_lightning_classes())
    assert {"RunCheckpoint", "AppendingCSVLogger", "VAEModule"} <= {c.__name__ for c in found}  # the walk sees them
    overridden = []
    for cls in found:
        lightning = [b for b in cls.__mro__[1:] if b.__module__.startswith("lightning")]
        for name, attr in vars(cls).items():
            method = callable(attr) or isinstance(attr, (property, staticmethod, classmethod))
            if method and name.startswith("_") and not name.startswith("__") and any(name in vars(b) for b in lightning):
                overridden.append(f"{cls.__module__}.{cls.__name__}.{name}")
        source = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        for node in ast.walk(source):  # nor called: self._x where Lightning's base defines _x
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in vars(cls) and any(callable(vars(b).get(node.attr)) for b in lightning):
                overridden.append(f"{cls.__module__}.{cls.__name__} uses self.{node.attr}")
    assert not overridden, f"underscored Lightning methods overridden or called: {overridden}"


def test_no_write_to_a_trainers_loops():
    """No assignment to anything under ``trainer.fit_loop`` (a loop's internals): the epoch limit
    is the Trainer's argument, a stop is ``trainer.should_stop``."""
    writes = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if "_loop" in ast.unparse(target):
                    writes.append(f"{_module_name(path)}:{node.lineno}: {ast.unparse(node)}")
    assert not writes, writes


def test_lightning_glue_lives_in_one_package():
    """Every class of lipvae's built on a Lightning class (module, callbacks, loggers) is in
    lipvae.lightning; the data modules (lipvae.data, lipvae.datamodules) are the one exception."""
    from lightning import LightningDataModule

    found = list(_lightning_classes())
    elsewhere = [f"{c.__module__}.{c.__name__}" for c in found
                 if not c.__module__.startswith("lipvae.lightning.") and not issubclass(c, LightningDataModule)]
    assert len(found) >= 10 and not elsewhere, elsewhere
