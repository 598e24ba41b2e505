#!/usr/bin/env python3
"""Fail if a lower room of the ``streamseg`` package imports a higher one.

The package is layered by data flow.  Every module belongs to a *room* with a rank; a module
may import modules of its own room or of rooms with a strictly lower rank, never a room of the
same rank (peers stay independent) or above.  Imports anywhere in a module count, including
those inside functions (a lazy import is still a dependency).

Usage::

    python tools/check_layout.py [PACKAGE_DIR]      # default: streamseg/ next to this script

Exit status 0 when the layout holds, 1 with one line per offending import otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

__all__ = ["RANKS", "check", "main", "room_of"]

#: Rank of each room; a module may only import rooms of strictly lower rank, or its own room.
RANKS: dict[str, int] = {
    "errors": 0,
    "progress": 0,
    "native_stderr": 0,
    "io": 1,
    "parallel": 1,
    "models": 1,
    "store": 2,
    "pipeline": 3,
    "bench": 4,
    "demo": 5,
    "cli": 6,
    "__init__": 7,  # the public facade may re-export anything
}


def room_of(parts: tuple[str, ...]) -> str:
    """Return the room of a module given its dotted path inside the package.

    Parameters
    ----------
    parts : tuple of str
        Module path relative to the package, e.g. ``("store", "reader")``; ``()`` is the
        package's own ``__init__``.
    """
    return parts[0] if parts else "__init__"


def _imports(tree: ast.AST, module: tuple[str, ...], is_pkg: bool) -> list[tuple[int, tuple[str, ...]]]:
    """Every in-package module path a module imports, with its line number."""
    found: list[tuple[int, tuple[str, ...]]] = []
    package = module if is_pkg else module[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                if node.level - 1 > len(package):
                    continue
                target = base + tuple(node.module.split(".")) if node.module else base
            elif node.module and node.module.split(".")[0] == PACKAGE:
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            if not target:  # "from streamseg import x" / "from .. import x": x names the room
                for alias in node.names:
                    found.append((node.lineno, (alias.name,)))
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.append((node.lineno, tuple(parts[1:])))
    return found


PACKAGE = "streamseg"


def check(package_dir: Path) -> list[str]:
    """Return one message per import that breaks the layout (empty when it holds).

    Parameters
    ----------
    package_dir : Path
        The package folder (``streamseg/``).
    """
    problems: list[str] = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).with_suffix("").parts
        is_pkg = rel[-1] == "__init__"
        module = rel[:-1] if is_pkg else rel
        room = room_of(module)
        if room not in RANKS:
            problems.append(f"{path}: module is in no known room {room!r}; add it to RANKS in {__file__}")
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:
            problems.append(f"{path}:{exc.lineno}: cannot parse: {exc.msg}")
            continue
        for lineno, target in _imports(tree, module, is_pkg):
            other = room_of(target)
            if other == room or other not in RANKS:
                continue
            if RANKS[other] >= RANKS[room]:
                dotted = ".".join((PACKAGE, *target))
                problems.append(
                    f"{path}:{lineno}: room {room!r} (rank {RANKS[room]}) imports {dotted} "
                    f"of room {other!r} (rank {RANKS[other]}); a room may import only lower ones"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: check the package folder given (or the repository's)."""
    args = sys.argv[1:] if argv is None else argv
    package_dir = Path(args[0]) if args else Path(__file__).resolve().parent.parent / PACKAGE
    if not package_dir.is_dir():
        print(f"check_layout: no package folder at {package_dir}", file=sys.stderr)
        return 2
    problems = check(package_dir)
    for line in problems:
        print(line)
    if problems:
        print(f"check_layout: {len(problems)} upward import(s) in {package_dir}", file=sys.stderr)
        return 1
    print(f"check_layout: {package_dir} layered as declared ({len(RANKS)} rooms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
