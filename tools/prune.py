"""Dead-code removal for the bundler, on the one flat module: what nothing reaches goes.

Roots are the top-level statements that run for their effect (calls, `if __name__ == "__main__"`, attribute
stores). A top-level function, class, assignment or import stays when a live statement names it; a method
stays when it is a dunder or its name is used as an attribute (or a string) anywhere live. Docstrings and
other bare strings go; so do annotations that never run (only dataclass fields keep theirs).
"""

from __future__ import annotations

import ast

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
BODIES = ("body", "orelse", "finalbody")


def strip_text(tree: ast.Module) -> None:
    """Docstrings and other bare strings go; `x: T = v` outside class bodies becomes `x = v` (a bare `x: T`
    goes). One walk."""
    for node in ast.walk(tree):
        in_class = isinstance(node, ast.ClassDef)
        for attr in BODIES:
            body = getattr(node, attr, None)
            if not isinstance(body, list):
                continue
            out = []
            for s in body:
                if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str):
                    continue
                if isinstance(s, ast.AnnAssign) and not in_class:
                    if s.value is None:
                        continue
                    s = ast.copy_location(ast.Assign(targets=[s.target], value=s.value), s)
                out.append(s)
            body[:] = out


def fill_empty_bodies(tree: ast.AST) -> None:
    """A body that folding or pruning emptied gets a `pass` (an emptied else or finally is simply gone)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and not body:
            body.append(ast.Pass())


def _uses(nodes, skip_annotations: bool = True) -> tuple[set, set]:
    """(names loaded, attribute names and strings) in these nodes, annotations not counted."""
    names, attrs = set(), set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if isinstance(n, ast.AnnAssign) and skip_annotations:
            todo.extend(x for x in (n.target, n.value) if x is not None)
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            attrs.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            attrs.add(n.value)
        elif isinstance(n, ast.keyword) and n.arg:
            attrs.add(n.arg)
        todo.extend(ast.iter_child_nodes(n))
    return names, attrs


def _defines(stmt: ast.stmt) -> list[str] | None:
    """Top-level names a prunable statement binds, or None for a statement that runs for its effect."""
    if isinstance(stmt, (*FUNCTIONS, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            return None
        return [(a.asname or a.name).split(".")[0] for a in stmt.names]
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        if stmt.value is not None and not _pure(stmt.value):
            return None  # `X = f()` runs f for its effects too: kept
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = []
        for t in targets:
            elts = t.elts if isinstance(t, ast.Tuple) else [t]
            if not all(isinstance(e, ast.Name) for e in elts):
                return None
            names += [e.id for e in elts]
        return names
    return None


# Calls that only build a value: an assignment made of these may go when nothing reads it.
PURE_CALLS = {"dict", "frozenset", "tuple", "set", "list", "object", "range", "float", "int", "str", "bytes",
              "sorted", "len", "max", "min", "Path", "compile", "field", "dataclass", "namedtuple", "TypeVar"}


def _pure(expr: ast.expr) -> bool:
    for n in ast.walk(expr):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name not in PURE_CALLS:
                return False
    return True


def _is_method(s: ast.stmt) -> bool:
    return isinstance(s, FUNCTIONS)


def prune(tree: ast.Module, keep: tuple[str, ...] = (), text: bool = True) -> ast.Module:
    """Drop what nothing reaches (and, with `text`, docstrings and annotations first)."""
    if text:
        strip_text(tree)
    defs: dict[str, list[ast.stmt]] = {}
    roots = []
    for stmt in tree.body:
        names = _defines(stmt)
        if names is None:
            roots.append(stmt)
        else:
            for n in names:
                defs.setdefault(n, []).append(stmt)
    live_names, live_attrs = set(keep), set()
    live_stmts: set[int] = set()
    live_methods: set[int] = set()
    pending = list(roots)

    def add(nodes):
        names, attrs = _uses(nodes)
        new_names = names - live_names
        live_names.update(names)
        live_attrs.update(attrs)
        return new_names

    for stmt in roots:
        live_stmts.add(id(stmt))
    changed = True
    add(pending)
    while changed:
        changed = False
        for name in list(live_names):
            for stmt in defs.get(name, []):
                if id(stmt) in live_stmts:
                    continue
                live_stmts.add(id(stmt))
                changed = True
                if isinstance(stmt, ast.ClassDef):
                    add(stmt.bases + stmt.decorator_list + [k.value for k in stmt.keywords]
                        + [s for s in stmt.body if not _is_method(s)])
                elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    pass
                else:
                    add([stmt])
        for stmt in tree.body:  # methods of live classes, by the attribute names in use
            if not isinstance(stmt, ast.ClassDef) or id(stmt) not in live_stmts:
                continue
            # A subclass of a class from elsewhere (torch.autograd.Function, Exception) keeps every method:
            # its framework calls them by names this code never spells.
            foreign = any(not (isinstance(b, ast.Name) and b.id in defs) for b in stmt.bases)
            for m in stmt.body:
                if not _is_method(m) or id(m) in live_methods:
                    continue
                if foreign or (m.name.startswith("__") and m.name.endswith("__")) or m.name in live_attrs:
                    live_methods.add(id(m))
                    add(m.decorator_list + [m])
                    changed = True
    body = []
    for stmt in tree.body:
        names = _defines(stmt)
        if names is None:
            body.append(stmt)
            continue
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            stmt.names = [a for a in stmt.names if (a.asname or a.name).split(".")[0] in live_names]
            if stmt.names:
                body.append(stmt)
            continue
        if id(stmt) not in live_stmts:
            continue
        if isinstance(stmt, ast.ClassDef):
            stmt.body = [s for s in stmt.body if not _is_method(s) or id(s) in live_methods] or [ast.Pass()]
        body.append(stmt)
    tree.body = body
    fill_empty_bodies(tree)
    return tree
