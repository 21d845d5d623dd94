"""Parameters the bundle never varies, for the fold (tools/fold.py): what every call of a function or method
passes for a parameter, when it is a constant, the config or one of its sections, or an attribute that the
caller's own __init__ fixes. The Folder then folds them inside the function as it folds config values."""

from __future__ import annotations

import ast

from tools.fold import PASSED_OBJECTS, ConfigPath, Folder, _attribute_binds, _positional, dotted


def _defaults(fn) -> dict[str, ast.expr]:
    pos = _positional(fn)
    out = dict(zip(pos[len(pos) - len(fn.args.defaults):], fn.args.defaults))
    out.update({a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None})
    return out


def constant_params(tree: ast.Module, folder: Folder) -> dict[int, dict[str, object]]:
    """{id(function): {parameter: value}} for the functions and methods of a flat module whose every call
    passes the same constant for a parameter (or leaves its constant default): what the bundle never varies.
    Functions are called by name, constructors by class name (their __init__), methods by an attribute
    name that only that method has, or as `self.name(...)` in their own class when no class extends it; any
    other use of the name (a function passed as a value, a call on another object) gives up."""
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    subclassed = {b.id for c in classes for b in c.bases if isinstance(b, ast.Name)}
    methods: dict[str, list] = {}
    for cls in classes:
        for m in cls.body:
            if isinstance(m, ast.FunctionDef):
                methods.setdefault(m.name, []).append((cls, m))
                if m.name == "__init__" and cls.name not in subclassed:  # (a subclass's super() passes others)
                    funcs[cls.name] = m  # Cls(...) calls __init__ with the instance first
    targets = {name: (fn, 0 if fn.name != "__init__" else 1) for name, fn in funcs.items()}
    for name, ms in methods.items():
        if name.startswith("__"):
            continue
        if len(ms) == 1:
            targets[f".{name}"] = (ms[0][1], 1)
        else:  # a name several classes define: only `self.name(...)` inside a class no other class extends
            targets.update({f"{c.name}.{name}": (m, 1) for c, m in ms if c.name not in subclassed})
    calls: dict[str, list] = {}
    enclosing: dict[int, object] = {}
    callee_ids = set()
    other_calls = set()  # `x.name(...)` of a several-class method name that no class's own call resolves

    escaped = set()

    def own_key(f, fn, cls):
        """`self.name` inside a method of the class that defines name: that class's key."""
        own = _positional(fn)[:1] if fn is not None and cls is not None else []
        if own and isinstance(f.value, ast.Name) and f.value.id == own[0] and f"{cls.name}.{f.attr}" in targets:
            return f"{cls.name}.{f.attr}"
        return None

    def key_of(call, fn, cls):
        f = call.func
        if isinstance(f, ast.Name):
            return f.id
        if not isinstance(f, ast.Attribute):
            return None
        if f".{f.attr}" in targets:
            return f".{f.attr}"
        key = own_key(f, fn, cls)
        if key is None:  # a call on another object: any class's method of that name
            escaped.update(k for k in targets if k.split(".")[-1] == f.attr and "." in k[1:])
        return key

    def walk(node, fn, cls):
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            inner_cls = child if isinstance(child, ast.ClassDef) else cls
            if isinstance(child, ast.Call):
                key = key_of(child, fn, cls)
                if key in targets:
                    calls.setdefault(key, []).append(child)
                    enclosing[id(child)], enclosing_cls[id(child)] = fn, cls
                    callee_ids.add(id(child.func))
            elif isinstance(child, ast.Name) and child.id in targets and id(child) not in callee_ids:
                escaped.add(child.id)  # a function passed as a value
            elif isinstance(child, ast.Attribute) and id(child) not in callee_ids:
                key = own_key(child, fn, cls) if f".{child.attr}" not in targets else f".{child.attr}"
                escaped.update([key] if key else [k for k in targets if "." in k and k.split(".")[-1] == child.attr])
            walk(child, inner, inner_cls)

    enclosing_cls: dict[int, object] = {}
    walk(tree, None, None)
    known: dict[int, dict[str, object]] = {}
    folder.attr_binds, folder.subclassed = _attribute_binds(tree), subclassed
    for _ in range(4):  # constants flow through calls that pass a parameter on (or an attribute made from one)
        changed = False
        folder.known_params = known
        instance = {c.name: folder._instance_constants(c) for c in classes}
        for key, (fn, skip) in targets.items():
            if key in escaped or key not in calls:
                continue
            values = _call_constants(fn, skip, calls[key], enclosing, known, enclosing_cls, instance)
            if values != known.get(id(fn), {}):
                known[id(fn)], changed = values, True
        if not changed:
            break
    return known


def _call_constants(fn, skip, calls, enclosing, known, enclosing_cls, instance) -> dict[str, object]:
    pos, defaults = _positional(fn)[skip:], _defaults(fn)
    candidates: dict[str, object] | None = None
    for call in calls:
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            return {}
        caller = enclosing[id(call)]
        caller_known = known.get(id(caller), {}) if caller is not None else {}
        cls = enclosing_cls.get(id(call))
        own = _positional(caller)[:1] if caller is not None and cls is not None else []
        fixed = instance.get(cls.name, {}) if own else {}  # {"self.X": v} of the caller's own instance
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
            elif dotted(expr) in fixed and dotted(expr).split(".")[0] == own[0]:
                here[p] = fixed[dotted(expr)]
            elif dotted(expr) is not None:  # the config or a section of it (through the caller's own, too)
                head, _, rest = dotted(expr).partition(".")
                if isinstance(caller_known.get(head), ConfigPath):
                    head = caller_known[head].path
                path = PASSED_OBJECTS.get(head + ("." + rest if rest else ""))
                if path is not None:
                    here[p] = ConfigPath(path)
        if candidates is None:
            candidates = here
        else:
            candidates = {k: v for k, v in candidates.items() if k in here and here[k] == v
                          and type(here[k]) is type(v)}
    return candidates or {}
