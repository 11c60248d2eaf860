"""The import directions the layout promises, read from the source: the pure rules import no I/O, the offline
shell and the worker never import each other, and the rules never import what holds bytes.

Each module's imports are read with `ast` (imports inside functions too), so a lazy import cannot hide one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

STREAMS = Path(__file__).resolve().parent.parent / "streams"

# the pure rules: the standard library and their own package (persons builds on identity), nothing else
PURE = {"identity": {"streams.identity"}, "persons": {"streams.persons", "streams.identity"}}
# the two shells around the shared step (`streams.enrich`): neither imports the other
OFFLINE = {"streams.replay", "streams.replay_jobs", "streams.persons_offline"}
WORKER = {"streams.app", "streams.pipeline", "streams.persons_stage", "streams.restore", "streams.devicestore",
          "streams.transactions", "streams.retries", "streams.web"}


def module_name(path: Path) -> str:
    parts = path.relative_to(STREAMS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module the file imports, absolute (relative imports resolved against its package)."""
    if package is None:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # `from . import codec`: the names may be modules
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names or name == "__future__"


def known(name: str) -> bool:
    """Whether `name` is one of the project's modules or packages (not a name imported from one)."""
    path = STREAMS.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


@pytest.mark.parametrize("package", sorted(PURE))
def test_the_rules_are_pure(package: str) -> None:
    allowed = PURE[package]
    wrong = []
    for path in modules(STREAMS / package):
        for name in imports(path):
            if is_stdlib(name) or any(name == a or name.startswith(a + ".") for a in allowed):
                continue
            if name.startswith("streams.") and not known(name):
                continue  # a name imported from an allowed module, not a module
            wrong.append(f"{path.relative_to(STREAMS.parent)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_offline_shell_and_the_worker_never_import_each_other() -> None:
    crossing = []
    for path in modules(STREAMS):
        name = module_name(path)
        other = WORKER if name in OFFLINE else OFFLINE if name in WORKER else set()
        crossing += [f"{name} imports {i}" for i in imports(path) if i in other]
    assert not crossing, "\n".join(crossing)


def test_the_lists_name_real_modules() -> None:
    """The sets above follow the files: a module renamed or moved must be placed again."""
    assert all(known(name) for name in OFFLINE | WORKER)


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The reader sees what the checks look for: a lazy import inside a function, and a relative one."""
    source = tmp_path / "probe.py"
    source.write_text("from . import codec\ndef f():\n    import orjson\n    from ..app import create_app\n")
    found = imports(source, "streams.identity")
    assert {"orjson", "streams.identity.codec", "streams.app", "streams.app.create_app"} <= found
