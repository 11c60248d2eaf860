"""The layout's promises, read from the source: what each part of the package may import (the pure rules no I/O,
the offline shell and the worker never each other, nothing below a shell imports it), and the size of modules.

Each module's imports are read with `ast` (imports inside functions too), so a lazy import cannot hide one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

STREAMS = Path(__file__).resolve().parent.parent / "streams"

# Each part of the package, and the parts it may import (besides itself and the standard library; third-party
# packages are free outside the rules). Read top down, it is the data path: the rules, the codec that holds bytes
# <-> records, the step shared by both shells (and the one settings object), the plumbing (Kafka, state), the
# two shells, and the faces on top.
RULES = ("streams.identity", "streams.persons")
LAYERS: dict[str, tuple[str, ...]] = {
    "streams.identity": (),
    "streams.persons": ("streams.identity",),
    "streams.codec": RULES,
    "streams.enrich": (*RULES, "streams.codec"),
    "streams.config": (*RULES, "streams.codec", "streams.enrich"),
    "streams.gcpolicy": (),
    "streams.progress": (),  # a long command's progress line (replay, load)
    "streams.kafka": ("streams.config",),
    "streams.state": (*RULES, "streams.codec"),
    "streams.offline": (*RULES, "streams.codec", "streams.enrich", "streams.config", "streams.gcpolicy",
                        "streams.state", "streams.progress"),
    "streams.worker": (*RULES, "streams.codec", "streams.enrich", "streams.config", "streams.gcpolicy",
                       "streams.state", "streams.kafka"),
    "streams.web": (*RULES, "streams.codec", "streams.config", "streams.state", "streams.kafka",
                    "streams.worker"),
    # the topics' reader: Kafka in, DuckDB out
    "streams.warehouse": ("streams.config", "streams.kafka", "streams.progress"),
    "streams.cli": ("streams",),  # the command line reaches everything
    "streams.__main__": ("streams.cli",),
    "streams": (),
}


def part_of(module: str) -> str:
    """The entry of LAYERS a module belongs to: the longest that names it or a package above it."""
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


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


def test_every_module_imports_only_what_its_part_may() -> None:
    wrong = []
    for path in modules(STREAMS):
        name = module_name(path)
        part = part_of(name)
        for imported in sorted(imports(path)):
            if is_stdlib(imported) or imported == "streams":  # `from streams import codec` names codec too
                continue
            if not imported.startswith("streams"):
                if part in RULES:
                    wrong.append(f"{name} imports {imported}: the rules are pure (no I/O, no third-party code)")
                continue
            if not known(imported) and "." in imported:
                imported = imported.rpartition(".")[0]  # a name imported from a module
            other = part_of(imported)
            if other == part or any(other == a or other.startswith(a + ".") for a in LAYERS[part]):
                continue
            wrong.append(f"{name} imports {imported}: {part} may import {', '.join(LAYERS[part]) or 'nothing'}")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_part() -> None:
    """A new top-level module or folder takes its place in LAYERS (else it would fall under "streams")."""
    loose = [module_name(p) for p in modules(STREAMS) if part_of(module_name(p)) == "streams"
             and module_name(p) != "streams"]
    assert not loose, loose


def test_no_module_is_over_400_lines() -> None:
    long = {module_name(p): n for p in modules(STREAMS) if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The reader sees what the checks look for: a lazy import inside a function, and a relative one."""
    source = tmp_path / "probe.py"
    source.write_text("from . import codec\ndef f():\n    import orjson\n    from ..app import create_app\n")
    found = imports(source, "streams.identity")
    assert {"orjson", "streams.identity.codec", "streams.app", "streams.app.create_app"} <= found
