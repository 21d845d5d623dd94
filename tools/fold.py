"""Branch folding for the bundler: the resolved config's values put into `if` tests, dead branches dropped.

A test folds when every part of it is known: constants, and attribute paths whose value the export fixes
(`spec.q_rank`, `self.cfg.artifact.gptq`, ... and local names bound once to such a path, like
`art = cfg.artifact`). Spec fields that change while a run trains (the layer plan under progressive depth)
are never fixed; `cross_repeat_skips` only when off (a truncated plan can switch it off, never on).

Checks that export already ran go too: inside the classes of the config's own objects (`config_classes`),
`self` is the config object for the test of an `if` that only raises (`if self.q_rank < 0: raise ...`, also
over a loop of constant names with `getattr(self, name)`), and such a check that the export's values pass is
dropped. Only checks: a method's other branches still read the instance, which may be a depth variant.
"""

from __future__ import annotations

import ast
import dataclasses
import operator

SPEC_PATHS = ("spec", "self.spec", "cfg.model", "self.cfg.model")
CONFIG_OBJECTS = ("cfg", "self.cfg")
CONFIG_SECTIONS = ("train", "optim", "data", "artifact", "eval", "average")
PLAN_FIELDS = ("layer_plan", "num_layers")
OFF_ONLY_FIELDS = ("cross_repeat_skips",)

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
               ast.Mod: operator.mod, ast.Div: operator.truediv}
_UNKNOWN = object()
_IMMUTABLE = (bool, int, float, str, type(None))


def _immutable(v) -> bool:
    return isinstance(v, _IMMUTABLE) or (isinstance(v, (tuple, frozenset)) and all(_immutable(x) for x in v))


def module_constants(tree: ast.Module) -> dict[str, object]:
    """Top-level `NAME = <literal>` (numbers, strings, tuples of them) that nothing else in the module binds:
    in one flat module (the bundle), a constant wherever it is read."""
    found = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                v = ast.literal_eval(stmt.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if _immutable(v):
                found[stmt.targets[0].id] = v
    binds: dict[str, int] = {}
    for n in ast.walk(tree):
        names = []
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names = [n.id]
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [n.name]
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            pass
        elif isinstance(n, ast.arg):
            names = [n.arg]
        elif isinstance(n, ast.alias):
            names = [(n.asname or n.name).split(".")[0]]
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            names = list(n.names) * 2
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names = [n.name]
        for name in names:
            binds[name] = binds.get(name, 0) + 1
    return {k: v for k, v in found.items() if binds.get(k) == 1}


def config_values(cfg, open_keys=()) -> dict[str, object]:
    """{dotted path: value} that a bundle of this RunConfig may treat as constants: every config key but
    `open_keys` ("train.iterations", ...: what the script's environment knobs may change)."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(cfg.model):
        v = getattr(cfg.model, f.name)
        if f.name in PLAN_FIELDS or (f.name in OFF_ONLY_FIELDS and v):
            continue
        for prefix in SPEC_PATHS:
            values[f"{prefix}.{f.name}"] = v
    for section in CONFIG_SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            if f"{section}.{f.name}" in open_keys:
                continue
            for prefix in CONFIG_OBJECTS:
                values[f"{prefix}.{section}.{f.name}"] = getattr(obj, f.name)
    return values


def config_classes(cfg) -> dict[str, str]:
    """{class name: the config path its instance is}: `self` inside those classes' checks (see above)."""
    out = {type(cfg.model).__name__: "spec", type(cfg).__name__: "cfg"}
    for section in CONFIG_SECTIONS:
        out.setdefault(type(getattr(cfg, section)).__name__, f"cfg.{section}")
    return out


def _is_check(node: ast.stmt) -> bool:
    """`if TEST: ... raise` with no else: a validation (its body ends in a raise)."""
    return (isinstance(node, ast.If) and not node.orelse and bool(node.body)
            and isinstance(node.body[-1], ast.Raise))


def dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


class Folder(ast.NodeTransformer):
    def __init__(self, values: dict[str, object] | None = None, classes: dict[str, str] | None = None):
        self.values = values or {}
        self.classes = classes or {}  # config class name -> its path, for `self` in checks
        self.check_self: list[str | None] = [None]
        self.objects = {p.rsplit(".", 1)[0] for p in self.values}  # paths that have known fields
        self.objects |= {o.rsplit(".", 1)[0] for o in list(self.objects) if "." in o}
        self.aliases: list[dict[str, str]] = [{}]
        self.known_params: dict[int, dict[str, object]] = {}  # id(function) -> {parameter: constant}
        self.folded = 0
        self.flat = False  # set for the pass over the one flat module: its literal constants fold too

    # -- local aliases: `art = cfg.artifact`, `cfg, t = self.cfg, self.cfg.train` --

    def _path(self, node) -> str | None:
        path = dotted(node)
        if path is None:
            return None
        head, _, rest = path.partition(".")
        for scope in reversed(self.aliases):
            if head in scope:
                return scope[head] + ("." + rest if rest else "")
        return path

    def _function_aliases(self, fn) -> dict[str, str]:
        stores: dict[str, int] = {}
        for n in ast.walk(fn):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                stores[n.id] = stores.get(n.id, 0) + 1
        args = fn.args
        for a in args.posonlyargs + args.args + args.kwonlyargs:
            stores[a.arg] = stores.get(a.arg, 0) + 1
        found: dict[str, str] = {}
        for name, value in self.known_params.get(id(fn), {}).items():
            if stores.get(name) == 1:  # the parameter itself, never reassigned
                found[name] = f"<param {id(fn)}>.{name}"
                self.values[found[name]] = value
        for stmt in fn.body:
            if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
                continue
            target, value = stmt.targets[0], stmt.value
            pairs = [(target, value)]
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
                pairs = list(zip(target.elts, value.elts))
            for t, v in pairs:
                if not isinstance(t, ast.Name) or stores.get(t.id) != 1:
                    continue
                self.aliases.append(found)
                path = self._path(v)
                known = self.value(v)
                self.aliases.pop()
                if path in self.objects:
                    found[t.id] = path
                elif known is not _UNKNOWN and isinstance(known, (bool, int, float, str, type(None))):
                    found[t.id] = f"<local>.{t.id}"  # a local bound once to a value the config fixes
                    self.values[found[t.id]] = known
        return found

    def visit_FunctionDef(self, node):
        self.aliases.append(self._function_aliases(node))
        try:
            return self.generic_visit(node)
        finally:
            self.aliases.pop()

    def generic_visit(self, node):
        node = super().generic_visit(node)
        for attr in ("body", "orelse", "finalbody"):
            body = getattr(node, attr, None)
            if isinstance(body, list):  # what follows a return or raise never runs
                for i, stmt in enumerate(body):
                    if isinstance(stmt, (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                        del body[i + 1:]
                        break
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Module(self, node):
        if self.flat:
            for name, v in module_constants(node).items():
                self.values[name] = v
        return self.generic_visit(node)

    def visit_ClassDef(self, node):
        self.check_self.append(self.classes.get(node.name))
        try:
            return self.generic_visit(node)
        finally:
            self.check_self.pop()

    def _passes(self, test, bound: dict | None = None) -> bool:
        """Whether a check's test is known False for the config object (`self` as the config's own)."""
        path = self.check_self[-1]
        if path is None:
            return False
        scope = {"self": path}
        for name, v in (bound or {}).items():
            scope[name] = f"<check>.{name}"
            self.values[scope[name]] = v
        self.aliases.append(scope)
        try:
            return self.value(test) is False
        finally:
            self.aliases.pop()

    # -- evaluation --

    def value(self, node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Attribute, ast.Name)):
            path = self._path(node)
            return self.values.get(path, _UNKNOWN) if path else _UNKNOWN
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) == 2 and not node.keywords):
            name = self.value(node.args[1])
            path = self._path(node.args[0])
            if isinstance(name, str) and path:
                return self.values.get(f"{path}.{name}", _UNKNOWN)
            return _UNKNOWN
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            left, right = self.value(node.left), self.value(node.right)
            if any(v is _UNKNOWN or isinstance(v, bool) or not isinstance(v, (int, float)) for v in (left, right)):
                return _UNKNOWN
            try:
                return _ARITHMETIC[type(node.op)](left, right)
            except (ArithmeticError, ValueError):
                return _UNKNOWN
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            v = self.value(node.operand)
            return _UNKNOWN if v is _UNKNOWN else not v
        if isinstance(node, ast.Tuple):
            items = [self.value(e) for e in node.elts]
            return _UNKNOWN if any(i is _UNKNOWN for i in items) else tuple(items)
        if isinstance(node, ast.BoolOp):
            items = [self.value(v) for v in node.values]
            decisive = (lambda v: not v) if isinstance(node.op, ast.And) else bool
            for v in items:  # the conditions bundled here have no side effects to keep
                if v is not _UNKNOWN and decisive(v):
                    return v
            return _UNKNOWN if any(v is _UNKNOWN for v in items) else items[-1]
        if isinstance(node, ast.Compare):
            left = self.value(node.left)
            rights = [self.value(c) for c in node.comparators]
            if left is _UNKNOWN or any(r is _UNKNOWN for r in rights) or \
                    not all(type(op) in _COMPARE for op in node.ops):
                return _UNKNOWN
            for op, right in zip(node.ops, rights):
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        return _UNKNOWN

    # -- folding --

    def visit_If(self, node):
        node = self.generic_visit(node)
        v = self.value(node.test)
        if v is _UNKNOWN:
            if _is_check(node) and self._passes(node.test):
                self.folded += 1
                return None
            return node
        self.folded += 1
        return (node.body if v else node.orelse) or None

    def visit_IfExp(self, node):
        node = self.generic_visit(node)
        v = self.value(node.test)
        if v is _UNKNOWN:
            return node
        self.folded += 1
        return node.body if v else node.orelse

    def visit_For(self, node):
        node = self.generic_visit(node)
        it = node.iter
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range" and len(it.args) == 1:
            n = self.value(it.args[0])
            if isinstance(n, int) and n <= 0:
                self.folded += 1
                return node.orelse or None
        # `for name in ("a", "b"): if getattr(self, name) < 0: raise ...`: checks the config passes for each name
        if (self.check_self[-1] is not None and isinstance(node.target, ast.Name) and not node.orelse
                and isinstance(it, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in it.elts)
                and node.body and all(_is_check(s) for s in node.body)
                and all(self._passes(s.test, {node.target.id: e.value}) for e in it.elts for s in node.body)):
            self.folded += 1
            return None
        return node


def _positional(fn) -> list[str]:
    return [a.arg for a in fn.args.posonlyargs + fn.args.args]


def _defaults(fn) -> dict[str, ast.expr]:
    pos = _positional(fn)
    out = dict(zip(pos[len(pos) - len(fn.args.defaults):], fn.args.defaults))
    out.update({a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None})
    return out


def constant_params(tree: ast.Module, folder: Folder) -> dict[int, dict[str, object]]:
    """{id(function): {parameter: value}} for the functions and methods of a flat module whose every call
    passes the same constant for a parameter (or leaves its constant default): what the bundle never varies.
    Functions are called by name, constructors by class name (their __init__), methods by an attribute
    name that only that method has; any other use of the name (a function passed as a value) gives up."""
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    methods: dict[str, list] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for m in cls.body:
            if isinstance(m, ast.FunctionDef):
                methods.setdefault(m.name, []).append(m)
                if m.name == "__init__":
                    funcs[cls.name] = m  # Cls(...) calls __init__ with the instance first
    targets = {name: (fn, 0 if fn.name != "__init__" else 1) for name, fn in funcs.items()}
    targets.update({f".{name}": (ms[0], 1) for name, ms in methods.items() if len(ms) == 1 and
                    not name.startswith("__")})
    calls: dict[str, list] = {}
    enclosing: dict[int, object] = {}
    callee_ids = set()

    def walk(node, fn):
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if isinstance(child, ast.Call):
                key = child.func.id if isinstance(child.func, ast.Name) else \
                    f".{child.func.attr}" if isinstance(child.func, ast.Attribute) else None
                if key in targets:
                    calls.setdefault(key, []).append(child)
                    enclosing[id(child)] = fn
                    callee_ids.add(id(child.func))
            walk(child, inner)

    walk(tree, None)
    escaped = set()
    for n in ast.walk(tree):
        if id(n) in callee_ids:
            continue
        if isinstance(n, ast.Name) and n.id in targets:
            escaped.add(n.id)
        elif isinstance(n, ast.Attribute) and f".{n.attr}" in targets:
            escaped.add(f".{n.attr}")
    known: dict[int, dict[str, object]] = {}
    for _ in range(4):  # constants flow through calls that pass a parameter on
        changed = False
        for key, (fn, skip) in targets.items():
            if key in escaped or key not in calls:
                continue
            values = _call_constants(fn, skip, calls[key], enclosing, known)
            if values != known.get(id(fn), {}):
                known[id(fn)], changed = values, True
        if not changed:
            break
    return known


def _call_constants(fn, skip, calls, enclosing, known) -> dict[str, object]:
    pos, defaults = _positional(fn)[skip:], _defaults(fn)
    candidates: dict[str, object] | None = None
    for call in calls:
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            return {}
        caller = enclosing[id(call)]
        caller_known = known.get(id(caller), {}) if caller is not None else {}
        passed = dict(zip(pos, call.args))
        passed.update({k.arg: k.value for k in call.keywords})
        here = {}
        for p in pos + [a.arg for a in fn.args.kwonlyargs]:
            expr = passed.get(p, defaults.get(p))
            if expr is None:
                continue
            if isinstance(expr, ast.Name) and expr.id in caller_known:
                here[p] = caller_known[expr.id]
            elif isinstance(expr, ast.Constant):
                here[p] = expr.value
        if candidates is None:
            candidates = here
        else:
            candidates = {k: v for k, v in candidates.items() if k in here and here[k] == v
                          and type(here[k]) is type(v)}
    return candidates or {}
