"""The package imports downward only. LAYERS is the allowed layering, written once: a room (a subpackage or a
top-level module of megatron_narrow) may import from itself and from rooms in lower layers, never from its own
layer or above. Every import counts, module-level and function-local alike (a function-local import hides an
edge, it does not remove it); only `if TYPE_CHECKING:` imports, which never run, are exempt."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

LAYERS: tuple[tuple[str, ...], ...] = (
    ("variants", "file_safety"),
    ("config",),
    ("parallel",),
    ("data", "model"),
    ("formats", "cli"),  # the checkpoint file format and the HF key map; refusal/exit-code helpers
    ("training",),
    ("convert",),
    ("tasks", "mlm_report"),
    ("entry", "config_reference"),
    ("pretrain", "finetune"),
)
PACKAGE = REPO / "megatron_narrow"


def room_of(module: str) -> str | None:
    """`megatron_narrow.training.loop` -> `training`; None for the package itself or another package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "megatron_narrow" and len(parts) > 1 else None


def type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    exempt = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            exempt.update(id(inner) for child in node.body for inner in ast.walk(child))
    return exempt


def imported_rooms(path: Path) -> list[tuple[str, int]]:
    """(room, line) of every megatron_narrow import in the file."""
    tree = ast.parse(path.read_text())
    exempt = type_checking_blocks(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = ([f"{node.module}.{alias.name}" for alias in node.names] if node.module == "megatron_narrow"
                       else [node.module])
        else:
            continue
        found += [(room, node.lineno) for room in map(room_of, modules) if room is not None]
    return found


def test_every_room_is_in_one_layer():
    rooms = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    listed = [room for layer in LAYERS for room in layer]
    assert len(listed) == len(set(listed)), "a room is listed twice"
    assert rooms == set(listed), f"add to LAYERS: {sorted(rooms - set(listed))}; remove: {sorted(set(listed) - rooms)}"


def test_the_package_imports_downward_only():
    layer_of = {room: index for index, layer in enumerate(LAYERS) for room in layer}
    back_arrows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        source = relative.parts[0].removesuffix(".py") if len(relative.parts) == 1 else relative.parts[0]
        if source == "__init__":
            continue
        for target, line in imported_rooms(path):
            if target != source and layer_of[target] >= layer_of[source]:
                back_arrows.append(f"megatron_narrow/{relative}:{line}: {source} -> {target}")
    assert not back_arrows, "imports against the layering (tests/test_layering.py LAYERS):\n" + "\n".join(back_arrows)


def test_the_walk_sees_function_local_imports(tmp_path):
    """The check itself: a function-local import is found, one under TYPE_CHECKING is not."""
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megatron_narrow.config import A\n"
                      "def f():\n    from megatron_narrow.training.loop import pretrain\n")
    assert imported_rooms(module) == [("training", 5)]
