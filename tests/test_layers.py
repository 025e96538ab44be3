"""Import layers (docs/design.md): lower layers never import higher ones, and only the training
package (plus the memory estimator, lazily, for DeepSpeed's count-taking estimators) touches
deepspeed or torch.distributed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "giblet_ds"

# layer -> giblet_ds layers it may import (itself always allowed)
ALLOWED = {
    "errors": set(),
    "host": set(),
    "config": {"errors"},
    "model": {"errors", "config"},
    "losses": {"errors", "config", "model"},
    "metrics": {"errors"},
    "run": {"errors", "host"},
    "store": {"errors", "config", "host"},
    "resolve": {"errors", "config", "store"},
    "memory_estimate": {"errors", "config", "model"},
    "demo_data": {"errors", "store"},
    "checkpoint": {"errors", "config", "model", "run"},
    "report": {"errors", "config", "model", "metrics", "store", "checkpoint", "run"},
    "train": {"errors", "config", "model", "losses", "metrics", "store", "resolve", "run"},
    "evaluation": {"errors", "config", "model", "metrics", "store", "checkpoint", "run", "report"},
    "pretrained": {"errors", "config", "model", "metrics", "store", "checkpoint", "run", "report"},
}
DISTRIBUTED_OK = {"train", "memory_estimate"}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from torch import distributed` names torch.distributed
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


SOURCES = [
    p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py" or p.parent != PACKAGE
]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_respect_the_layers(path: Path) -> None:
    layer = _layer(path)
    assert layer in ALLOWED, f"{path} belongs to no layer; add it to ALLOWED and docs/design.md"
    bad = []
    for line, module in _imports(path):
        if module.startswith("giblet_ds."):
            target = module.split(".")[1]
            if target != layer and target not in ALLOWED[layer]:
                bad.append(f"{line}: {module}")
        elif (module == "deepspeed" or module.startswith(("deepspeed.", "torch.distributed"))) and (
            layer not in DISTRIBUTED_OK
        ):
            bad.append(f"{line}: {module}")
    assert bad == [], f"{path.relative_to(PACKAGE)} imports across layers: {bad}"
