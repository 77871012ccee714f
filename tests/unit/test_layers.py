"""The package's imports point one way (docs/architecture.md, "Layers"): a unit (a top-level module or
subpackage of titan_mem) imports only units on lower layers. Every import counts, those inside functions
included, so no late import can hide a cycle; a new unit must be given a layer here before it can land."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "titan_mem"

# Lowest first. Units on one line are independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),  # every error class a user can see, the one rule for what a command prints
    (
        "distributed",
        "config_fields",
    ),  # process group, rank helpers | how a config key is declared and checked
    ("cli",),  # run_cli: how every command line ends
    ("kernels", "data"),  # value lookup (torch + Triton); tokenizers, corpora, finetuning data, hub files
    ("models",),  # the plain model: transformer, memory layer, LoRA; no parallelism
    ("parallel",),  # applied to a plain model: FSDP2, column-sharded values, gradient paths
    ("sparse",),  # slot counts, scores, row selection, row-sparse updates (a library: no job runs here)
    ("checkpoint",),  # DCP folders, atomic files, knowledge patches
    ("config",),  # the TOML config: sections, loader, cross-section rules
    ("hf",),  # HF checkpoints in and out, retrofit, a checkpoint folder's config
    ("components",),  # the trainer's parts: model building, optimizers, lr, metrics, run control
    ("modes",),  # what each training mode freezes, steps and saves
    ("eval",),  # tasks, scoring, the evaluation runner, in-loop evaluation
    ("preflight",),  # checks before a launch
    ("train",),  # the Trainer and `python -m titan_mem.train`
    ("generate", "background_counts"),  # other jobs
    ("study", "bench"),  # the learning-vs-forgetting study | benchmarks against the tools users pick
]
LAYER = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def _module_parts(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(tree: ast.AST, parts: list[str], is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every titan_mem module an import statement names, relative imports resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] == PACKAGE.name]


def unit_imports() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, `file:line`) for every import that crosses units."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = _module_parts(path)
        if len(parts) < 2:
            continue  # titan_mem/__init__.py
        tree = ast.parse(path.read_text(), str(path))
        for line, module in _imported(tree, parts, path.name == "__init__.py"):
            target = module.split(".")
            if len(target) < 2 or target[1] == parts[1]:
                continue
            unit = target[1]
            if (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").exists():
                edges.append((parts[1], unit, f"{path.relative_to(PACKAGE.parent)}:{line}"))
    return sorted(set(edges))  # `from titan_mem.x import y` names both titan_mem.x and titan_mem.x.y


def upward(edges: list[tuple[str, str, str]]) -> list[str]:
    """The imports that do not point to a lower layer."""
    return [f"{where}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})"
            for src, dst, where in edges if LAYER[dst] >= LAYER[src]]  # fmt: skip


def test_every_unit_has_a_layer():
    units = {_module_parts(p)[1] for p in PACKAGE.rglob("*.py") if len(_module_parts(p)) >= 2}
    assert units - set(LAYER) == set(), "give the new unit a layer in LAYERS (and docs/architecture.md)"
    assert set(LAYER) - units == set(), "a unit in LAYERS no longer exists"


def test_imports_point_down():
    assert upward(unit_imports()) == []


@pytest.mark.parametrize(
    "source,import_line,refused",
    [
        ("distributed.py", "from titan_mem.config import Config", True),  # module level, upward
        ("sparse/select.py", "    from titan_mem.checkpoint import files", True),  # late (in a function)
        ("kernels/value_lookup.py", "from titan_mem import data", True),  # across one layer
        ("models/args.py", "from ..eval import tasks", True),  # relative, upward
        ("models/args.py", "from . import memory", False),  # within a unit
        ("data/hub.py", "from ..errors import UserError", False),  # relative, downward
    ],
)
def test_the_check_sees_each_kind_of_import(tmp_path, monkeypatch, source, import_line, refused):
    """A reintroduced upward import fails the test, wherever and however it is written."""
    copy = tmp_path / PACKAGE.name
    for path in PACKAGE.rglob("*.py"):
        (copy / path.relative_to(PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(PACKAGE)).write_text(path.read_text())
    edited = copy / source
    body = "def _late():\n" + import_line + "\n" if import_line.startswith(" ") else import_line + "\n"
    edited.write_text(edited.read_text() + "\n" + body)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    found = upward(unit_imports())
    assert len(found) == refused and all(line.startswith(f"{PACKAGE.name}/{source}:") for line in found)
