"""Branch folding for the bundler: the resolved config's values put into `if` tests, dead branches dropped.

A test folds when every part of it is known: constants, and attribute paths whose value the export fixes
(`spec.q_rank`, `self.cfg.artifact.gptq`, ... and local names bound once to such a path, like
`art = cfg.artifact`). Spec fields that change while a run trains (the layer plan under progressive depth)
are never fixed; `cross_repeat_skips` only when off (a truncated plan can switch it off, never on).

Checks that export already ran go too: inside the classes of the config's own objects (`config_classes`),
`self` is the config object for the test of an `if` that only raises (`if self.q_rank < 0: raise ...`, also
over a loop of constant names with `getattr(self, name)`), and such a check that the export's values pass is
dropped. Only checks: a method's other branches still read the instance, which may be a depth variant.

In the pass over the one flat module, literal module constants fold, and so do parameters every call fixes
(tools/fold_params.py) and an instance's attributes that its __init__ binds once to a fixed value or to a
config section (`self.optim = optim` with every caller passing cfg.optim).
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
# Builtins of immutable values that a bundle never rebinds (the bundler keeps every builtin's name free).
_PURE_BUILTINS = {"float": float, "int": int, "len": len, "abs": abs, "min": min, "max": max, "bool": bool,
                  "str": str}
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


@dataclasses.dataclass(frozen=True)
class ConfigPath:
    """What every call passes for a parameter when it is the config or one of its sections (`cfg.optim`): the
    parameter's fields fold as that path's."""
    path: str


# Paths of the config and its sections as callers spell them, to the path config_values knows them by. (The
# model spec is left out: a spec passed on may be a depth variant, and `spec` itself already folds.)
PASSED_OBJECTS = {f"{o}{s}": f"cfg{s}" for o in CONFIG_OBJECTS for s in ["", *(f".{x}" for x in CONFIG_SECTIONS)]}


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


def _attribute_binds(tree: ast.Module) -> dict[str, int]:
    """How often each attribute name is bound in the module (`x.name = ...`, `del x.name`,
    `setattr(x, "name", v)`): 1 is one assignment and nothing else. (A setattr whose name is not a constant
    is not followed: the bundled modules use it on torch's and dataclasses' objects only.)"""
    out: dict[str, int] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out[n.attr] = out.get(n.attr, 0) + 1
        elif isinstance(n, ast.Call) and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) and (
                isinstance(n.func, ast.Name) and n.func.id in ("setattr", "delattr")
                or isinstance(n.func, ast.Attribute) and n.func.attr in ("__setattr__", "__delattr__")):
            out[str(n.args[1].value)] = out.get(str(n.args[1].value), 0) + 2
    return out


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
        self.attr_binds: dict[str, int] = {}
        self.subclassed: set[str] = set()
        self.prefixes: dict[str, str] = {}  # "self.X" -> config path, inside the class that binds it

    # -- local aliases: `art = cfg.artifact`, `cfg, t = self.cfg, self.cfg.train` --

    def _path(self, node) -> str | None:
        path = dotted(node)
        if path is None:
            return None
        head, _, rest = path.partition(".")
        for scope in reversed(self.aliases):
            if head in scope:
                return scope[head] + ("." + rest if rest else "")
        for prefix, target in self.prefixes.items():  # `self.optim.x` where __init__ set self.optim = cfg.optim
            if path.startswith(prefix + "."):
                return target + path[len(prefix):]
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
            if stores.get(name) != 1:  # the parameter itself, never reassigned
                continue
            if isinstance(value, ConfigPath):
                found[name] = value.path
            else:
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
            self.attr_binds = _attribute_binds(node)
            self.subclassed = {b.id for c in node.body if isinstance(c, ast.ClassDef) for b in c.bases
                               if isinstance(b, ast.Name)}
        return self.generic_visit(node)

    def visit_ClassDef(self, node):
        self.check_self.append(self.classes.get(node.name))
        fixed = self._instance_constants(node) if self.flat else {}
        objects = {k: v.path for k, v in fixed.items() if isinstance(v, ConfigPath)}
        outer = self.prefixes
        self.prefixes = {**outer, **objects}
        self.values.update({k: v for k, v in fixed.items() if k not in objects})
        try:
            return self.generic_visit(node)
        finally:
            self.check_self.pop()
            self.prefixes = outer
            for path in fixed:
                if path not in objects:
                    self.values.pop(path, None)

    def _instance_constants(self, cls) -> dict[str, object]:
        """{"self.X": v} for `self.X = expr` in __init__'s own body, the only binding of an attribute X in the
        module (no other `.X =`, no "X" string as setattr would need), with expr fixed by the export (its
        parameters every call fixes): the same in every instance, so known in the class's methods."""
        if cls.name in self.subclassed:  # a subclass's instances bind these in their own way
            return {}
        init = next((m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"), None)
        own = _positional(init)[:1] if init is not None else []
        if not own:
            return {}
        self.aliases.append(self._function_aliases(init))
        try:
            found = {}
            for stmt in init.body:
                if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
                    continue
                target, value = stmt.targets[0], stmt.value
                pairs = list(zip(target.elts, value.elts)) if isinstance(target, ast.Tuple) and \
                    isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts) else [(target, value)]
                for t, v in pairs:
                    if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == own[0]
                            and self.attr_binds.get(t.attr) == 1):
                        known, path = self.value(v), self._path(v)
                        if known is not _UNKNOWN and _immutable(known):
                            found[f"{own[0]}.{t.attr}"] = known
                        elif path in PASSED_OBJECTS.values():
                            found[f"{own[0]}.{t.attr}"] = ConfigPath(path)
            return found
        finally:
            self.aliases.pop()

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
            v = self.value(test)
            return v is not _UNKNOWN and not v
        finally:
            self.aliases.pop()

    # -- evaluation --

    def value(self, node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Attribute, ast.Name)):
            path = self._path(node)
            return self.values.get(path, _UNKNOWN) if path else _UNKNOWN
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _PURE_BUILTINS
                and not node.keywords and node.func.id not in self.values):
            args = [self.value(a) for a in node.args]
            if any(a is _UNKNOWN or not _immutable(a) for a in args):
                return _UNKNOWN
            try:
                return _PURE_BUILTINS[node.func.id](*args)
            except (TypeError, ValueError, ArithmeticError):
                return _UNKNOWN
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) == 2 and not node.keywords):
            name = self.value(node.args[1])
            path = self._path(node.args[0])
            if isinstance(name, str) and path:
                return self.values.get(f"{path}.{name}", _UNKNOWN)
            return _UNKNOWN
        if isinstance(node, ast.IfExp):
            test = self.value(node.test)
            return _UNKNOWN if test is _UNKNOWN else self.value(node.body if test else node.orelse)
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
        # (the names whose checks all pass leave the loop; with none left, the loop goes)
        if (self.check_self[-1] is not None and isinstance(node.target, ast.Name) and not node.orelse
                and isinstance(it, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in it.elts)
                and node.body and all(_is_check(s) for s in node.body)):
            left = [e for e in it.elts if not all(self._passes(s.test, {node.target.id: e.value}) for s in node.body)]
            if not left:
                self.folded += 1
                return None
            it.elts = left
        return node


def _positional(fn) -> list[str]:
    return [a.arg for a in fn.args.posonlyargs + fn.args.args]
