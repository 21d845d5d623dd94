"""What the challenge counts: code bytes plus compressed model bytes, against 16,000,000 (decimal)."""

from __future__ import annotations

import ast
from pathlib import Path

CHALLENGE_LIMIT = 16_000_000
ROOT = Path(__file__).resolve().parent.parent

# Where a training run starts: the loop, data and tokenizer loading, and the backend's trainer.
ENTRY_MODULES = ("core.loop", "core.manifest", "core.tokenizer", "backend_{b}", "backend_{b}.trainer")


def _module_path(module: str) -> Path | None:
    parts = module.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _local_imports(path: Path, packages: tuple[str, ...]) -> set[str]:
    """Modules of `packages` that a file imports (at any depth: lazy imports count, they run too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.split(".")[0] in packages and _module_path(n)}
    return found


def code_files(backend: str) -> list[Path]:
    """The source a submission needs to train, evaluate and export with one backend: every module of
    core/ and backend_<backend>/ that a training run imports, found by following import statements.
    Tools (convert, parity, bench), tests and configs are not counted; nor is the other backend."""
    packages = ("core", f"backend_{backend}")
    todo = [m.format(b=backend) for m in ENTRY_MODULES]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or _module_path(module) is None:
            continue
        seen.add(module)
        parent = module.rsplit(".", 1)[0]
        if parent != module:
            todo.append(parent)  # importing a.b runs a/__init__.py
        todo.extend(_local_imports(_module_path(module), packages))
    return sorted({_module_path(m) for m in seen})


def code_bytes(backend: str) -> int:
    return sum(f.stat().st_size for f in code_files(backend))
