"""The package's structure as a specification: method families stay apart, private names stay in their module,
and every hook a callback or LightningModule overrides says so with ``@override``."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import lightning as L
import pytest

import lightning_incremental

PACKAGE = Path(lightning_incremental.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).parent.parts)


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split("."))
    return (PACKAGE.parent / relative.with_suffix(".py")).exists() or (PACKAGE.parent / relative).is_dir()


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every absolute import of the package in ``path`` (``name`` None for ``import m``)."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_incremental"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("lightning_incremental")]
    return found


def _family(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "methods" else None


def test_no_method_family_imports_another():
    crossings = []
    for path in SOURCES:
        own = _family(_module_name(path))
        for module, name in _imports(path):
            target = _family(f"{module}.{name}" if name and _is_module(f"{module}.{name}") else module)
            if own is not None and target is not None and target != own:
                crossings.append(f"{path.relative_to(PACKAGE)}: {module} import {name}")
    assert crossings == []


def test_no_private_name_is_imported_from_another_module_and_private_modules_stay_in_their_package():
    leaks = []
    for path in SOURCES:
        package = _package_of(path)
        for module, name in _imports(path):
            dotted = f"{module}.{name}" if name and _is_module(f"{module}.{name}") else module
            private_module = next(
                (
                    ".".join(dotted.split(".")[:i])
                    for i, part in enumerate(dotted.split("."), 1)
                    if part.startswith("_")
                ),
                None,
            )
            if private_module is not None and private_module.rpartition(".")[0] != package:
                leaks.append(f"{path.relative_to(PACKAGE)}: private module {private_module}")
            if name and name.startswith("_") and not _is_module(f"{module}.{name}"):
                leaks.append(f"{path.relative_to(PACKAGE)}: private name {module}.{name}")
    assert leaks == []


def _package_classes() -> list[type]:
    classes = {}
    for info in pkgutil.walk_packages(lightning_incremental.__path__, "lightning_incremental."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, L.Callback | L.LightningModule):
                classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(classes.values())


@pytest.mark.parametrize("cls", _package_classes(), ids=lambda cls: cls.__qualname__)
def test_every_overridden_hook_says_override(cls):
    missing = []
    for name, attribute in vars(cls).items():
        if name.startswith("__"):
            continue
        function = attribute.fget if isinstance(attribute, property) else attribute
        if not inspect.isfunction(function):
            continue
        overridden = any(name in vars(base) for base in cls.__mro__[1:] if base is not object)
        if overridden and not getattr(function, "__override__", False):
            missing.append(name)
    assert missing == []
