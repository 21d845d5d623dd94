"""Where an exported train_gpt.py's code bytes go: its bundled source's top-level functions and classes (and
each class's methods) by minified bytes, largest first.

    python scripts/code_bytes_by_function.py configs/record_1394.toml [--top 40] [--methods]

Each statement is minified on its own (locals renamed, globals kept), so the numbers add up to a little more
than the whole script's minified size; the lzma-packed script is about 0.4x of the minified total.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import load_config  # noqa: E402
from tools.script import template_source  # noqa: E402


def _minified_bytes(node: ast.AST) -> int:
    import python_minifier

    src = ast.unparse(node)
    return len(python_minifier.minify(src, remove_literal_statements=True, rename_globals=False).encode())


def _label(node: ast.stmt) -> str:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"def {node.name}"
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "import " + ",".join(a.asname or a.name for a in node.names)
    return ast.unparse(node).splitlines()[0][:60]


def rows(source: str, methods: bool) -> list[tuple[int, str]]:
    out = []
    for node in ast.parse(source).body:
        out.append((_minified_bytes(node), _label(node)))
        if methods and isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.append((_minified_bytes(m), f"  {node.name}.{m.name}"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--top", type=int, default=40, help="rows to print (0: all)")
    p.add_argument("--methods", action="store_true", help="also each class's methods")
    args = p.parse_args(argv)
    found = rows(template_source(load_config(args.config)), args.methods)
    total = sum(n for n, label in found if not label.startswith("  "))
    found.sort(key=lambda r: -r[0])
    print(f"{total:,} B minified over {sum(1 for _, lab in found if not lab.startswith('  '))} top-level statements")
    for n, label in found[: args.top or None]:
        print(f"{n:8,}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
