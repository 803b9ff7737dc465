"""The package's shape: stages import downward only. Shared things (checkpoint, device, distributed)
sit below every stage, nothing that loads a model for use reaches into training, and no two stages
import each other."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

KILN = Path(__file__).resolve().parents[1] / "kiln"


def imports_between_parts() -> dict[str, set[str]]:
    """For each top-level part of kiln (a folder or a module), the other parts it imports."""
    found = defaultdict(set)
    for path in KILN.rglob("*.py"):
        part = path.relative_to(KILN).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kiln."):
                target = node.module.split(".")[1]
                if target != part:
                    found[part].add(target)
    return found


def test_using_a_model_never_needs_the_training_stage():
    found = imports_between_parts()
    for part in ("generate", "evaluate", "interop", "checkpoint", "device", "distributed", "model", "data"):
        assert not found[part] & {"train", "finetune"}, f"kiln/{part} imports {found[part] & {'train', 'finetune'}}"


def test_no_import_cycles_between_parts():
    found = imports_between_parts()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in found[start])

    cycles = sorted(part for part in list(found) if reaches(part, part, {part}))
    assert not cycles, f"import cycles through {cycles}"
