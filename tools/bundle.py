"""The bundler behind `loopgolf export`: loopgolf's own modules inlined into one self-contained script.

Starting from an entry module, it follows the imports of the bundled packages (core, backend_torch), puts
every module it reaches into one namespace in the order Python would run them (a top-level name that two
modules both define is renamed in one; `mod.attr` on an imported module becomes the name itself), folds
the branches that the resolved config switches off (`fold.py`), drops what nothing reaches (functions,
classes, methods whose name nothing uses, imports), and strips docstrings. The result imports only the
standard library and third-party packages. What it cannot bundle is refused with the file and line.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from tools.fold import Folder

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "backend_torch")
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
          ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


class BundleError(UserError):
    pass


def module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def is_bundled(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    bindings: dict = field(default_factory=dict)  # top-level name -> ("own",) | ("ext", key) | ("mod", m) | ("attr", m, a)

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    def where(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"


def _import_targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The bundled modules an import statement runs (parents first, as Python does)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level or not node.module:
            return []
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    out = []
    for n in names:
        if not is_bundled(n):
            continue
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            m = ".".join(parts[:i])
            if module_path(m) is not None and m not in out:
                out.append(m)
    return out


def _is_main_guard(node: ast.stmt) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


class Bundle:
    """Parse, fold and order the modules an entry reaches."""

    def __init__(self, entry: str, folder: Folder | None = None, constants: dict | None = None):
        self.entry = entry
        self.folder = folder or Folder()
        self.constants = constants or {}
        self.modules: dict[str, Module] = {}
        self.order: list[str] = []
        self._load(entry)

    # ---- loading, in execution order ------------------------------------------------------------------

    def _parse(self, name: str) -> Module:
        path = module_path(name)
        if path is None:
            raise BundleError(f"cannot bundle: no module {name} in {', '.join(PACKAGES)}")
        tree = ast.parse(path.read_text(), str(path))
        mod = Module(name, path, tree)
        if name == self.entry:
            self._set_constants(mod)
        mod.tree = self.folder.visit(tree)  # branches the config switches off go before imports are followed
        return mod

    def _set_constants(self, mod: Module) -> None:
        """Top-level `NAME = ...` assignments of the entry module replaced by the export's values."""
        found = set()
        for node in mod.tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in self.constants:
                        value = self.constants[t.id]
                        node.value = value if isinstance(value, ast.AST) else ast.parse(repr(value), mode="eval").body
                        found.add(t.id)
        missing = set(self.constants) - found
        if missing:
            raise BundleError(f"cannot bundle: {mod.path.name} has no top-level {', '.join(sorted(missing))}")

    def _load(self, name: str) -> None:
        if name in self.modules:
            return
        mod = self._parse(name)
        self.modules[name] = mod
        if "." in name:
            self._load(name.rsplit(".", 1)[0])  # a package's __init__ runs before its modules
        nested = []
        for node in mod.tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _import_targets(node):
                    self._load(target)
        for node in ast.walk(mod.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                nested.extend(_import_targets(node))
        self.order.append(name)
        for target in nested:  # imported inside functions: defined before anything runs them
            self._load(target)

    # ---- the one namespace ----------------------------------------------------------------------------

    def _bind_top_level(self, mod: Module) -> None:
        b = mod.bindings
        for node in mod.tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    self._bind_import(mod, node, alias, b)
            elif isinstance(node, (*FUNCTIONS, ast.ClassDef)):
                b[node.name] = ("own",)
            else:
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                        b.setdefault(sub.id, ("own",))
                    elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                        if _import_targets(sub):
                            raise BundleError(f"cannot bundle: {mod.where(sub)}: a bundled import inside a "
                                              "top-level statement; import at the top of the module")
                        for alias in sub.names:
                            b.setdefault((alias.asname or alias.name).split(".")[0], ("own",))
                    elif isinstance(sub, (*FUNCTIONS, ast.ClassDef)) and sub is not node:
                        pass

    def _bind_import(self, mod: Module, node, alias: ast.alias, b: dict) -> None:
        if alias.name == "*":
            raise BundleError(f"cannot bundle: {mod.where(node)}: 'import *'")
        if isinstance(node, ast.Import):
            if is_bundled(alias.name):
                if alias.asname:
                    b[alias.asname] = ("mod", alias.name)
                else:
                    b[alias.name.split(".")[0]] = ("mod", alias.name.split(".")[0])
            else:
                local = alias.asname or alias.name.split(".")[0]
                b[local] = ("ext", ("import", alias.name, alias.asname))
        else:
            local = alias.asname or alias.name
            if is_bundled(node.module):
                b[local] = ("attr", node.module, alias.name)
            else:
                b[local] = ("ext", ("from", node.module, alias.name))

    def resolve(self, module: str, name: str, seen: frozenset = frozenset()):
        """What `name` at the top of `module` is: ("name", final global name), ("module", m), or None
        (not bound there: a builtin)."""
        if (module, name) in seen:
            raise BundleError(f"cannot bundle: circular re-export of {name} in {module}")
        mod = self.modules.get(module)
        binding = mod.bindings.get(name) if mod else None
        if binding is None:
            if module_path(f"{module}.{name}") is not None and f"{module}.{name}" in self.modules:
                return ("module", f"{module}.{name}")
            return None
        kind = binding[0]
        if kind in ("own", "ext"):
            return ("name", self.final_names[(module, name)])
        if kind == "mod":
            return ("module", binding[1])
        target_mod, attr = binding[1], binding[2]
        sub = f"{target_mod}.{attr}"
        if sub in self.modules and (self.modules[target_mod].is_package
                                    and attr not in self.modules[target_mod].bindings):
            return ("module", sub)
        found = self.resolve(target_mod, attr, seen | {(module, name)})
        if found is None:
            raise BundleError(f"cannot bundle: {module} imports {attr} from {target_mod}, which has no such name")
        return found

    def _assign_names(self) -> None:
        reserved = set(dir(builtins))
        for mod in self.modules.values():  # names some module means as a builtin keep that meaning
            for node in ast.walk(mod.tree):
                if isinstance(node, ast.Name) and node.id not in mod.bindings:
                    reserved.add(node.id)
        # A global reached as `mod.name` (or under an import alias) becomes a bare name where it is used: it must
        # not be one that a function there binds locally. Names bound in any function are kept off globals.
        local = set()
        for mod in self.modules.values():
            for top in mod.tree.body:
                if not isinstance(top, (*FUNCTIONS, ast.ClassDef)):
                    continue
                for sub in ast.walk(top):  # class attributes count too: harmless, and one walk
                    if isinstance(sub, (*FUNCTIONS, ast.Lambda)):
                        local |= _arg_names(sub.args)
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        local.add(sub.id)
                    elif isinstance(sub, (*FUNCTIONS, ast.ClassDef)) and sub is not top:
                        local.add(sub.name)
                    elif isinstance(sub, ast.alias):
                        local.add((sub.asname or sub.name).split(".")[0])
        used: set[str] = set()
        ext_names: dict = {}
        self.final_names: dict = {}
        for name in self.order:
            mod = self.modules[name]
            for local_name, binding in mod.bindings.items():
                if binding[0] == "ext" and binding[1] in ext_names:
                    self.final_names[(name, local_name)] = ext_names[binding[1]]
                    continue
                if binding[0] not in ("own", "ext"):
                    continue
                final = local_name
                # (a third-party import is only ever named inside its own module, as the original spells it)
                shadowed = local if binding[0] == "own" else set()
                if final in used or final in shadowed or (final in reserved and final not in mod.bindings):
                    stem = name.rsplit(".", 1)[-1].lstrip("_")
                    final, i = f"{local_name}_{stem}", 2
                    while final in used or final in reserved or final in shadowed:
                        final, i = f"{local_name}_{stem}{i}", i + 1
                used.add(final)
                self.final_names[(name, local_name)] = final
                if binding[0] == "ext":
                    ext_names[binding[1]] = final

    def flatten(self) -> ast.Module:
        for mod in self.modules.values():
            self._bind_top_level(mod)
        self._assign_names()
        body: list[ast.stmt] = [ast.ImportFrom(module="__future__", names=[ast.alias("annotations")], level=0)]
        emitted_ext: set = set()
        for name in self.order:
            mod = self.modules[name]
            renamed = Renamer(self, mod).visit(mod.tree)
            for node in renamed.body:
                if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                    continue
                if _is_main_guard(node) and name != self.entry:
                    continue
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    node = self._external_import(mod, node, emitted_ext)
                    if node is None:
                        continue
                body.append(node)
        return ast.Module(body=body, type_ignores=[])

    def _external_import(self, mod: Module, node, emitted: set):
        """A top-level import of a third-party or standard module, once, under its final name."""
        keep = []
        for alias in node.names:
            local = (alias.asname or alias.name).split(".")[0] if isinstance(node, ast.Import) else \
                (alias.asname or alias.name)
            binding = mod.bindings.get(local)
            if binding is None or binding[0] != "ext":
                continue  # a bundled import: its names were rewritten
            if binding[1] in emitted:
                continue
            emitted.add(binding[1])
            final = self.final_names[(mod.name, local)]
            if isinstance(node, ast.Import) and alias.asname is None and final != local:
                raise BundleError(f"cannot bundle: {mod.where(node)}: 'import {alias.name}' clashes with another "
                                  f"module's {local}; import it under another name")
            keep.append(ast.alias(alias.name, None if final == (alias.asname or alias.name.split(".")[0])
                                  and alias.asname is None else final))
        if not keep:
            return None
        if isinstance(node, ast.Import):
            return ast.Import(names=keep)
        return ast.ImportFrom(module=node.module, names=keep, level=0)


# ---- scopes -------------------------------------------------------------------------------------------

@dataclass
class Scope:
    kind: str  # "function" | "class"
    local: set
    aliases: dict  # local name bound by a bundled import -> its resolution
    declared_global: set
    store_globals: set = field(default_factory=set)  # module attributes this function assigns (see Renamer)


def _walk_scope(nodes):
    """The nodes that belong to this scope: not the insides of nested functions, lambdas, classes or
    comprehensions (but their decorators, defaults, bases and first iterable, which run here)."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, FUNCTIONS):
            todo.extend(node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d])
        elif isinstance(node, ast.Lambda):
            todo.extend(node.args.defaults + [d for d in node.args.kw_defaults if d])
        elif isinstance(node, ast.ClassDef):
            todo.extend(node.decorator_list + node.bases + [k.value for k in node.keywords])
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            todo.append(node.generators[0].iter)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _arg_names(args: ast.arguments) -> set:
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    names |= {a.arg for a in (args.vararg, args.kwarg) if a}
    return names


class Renamer(ast.NodeTransformer):
    """Rewrites one module into the bundle's namespace: globals to their final names, bundled imports
    removed (their names resolved), `module.attr` to the attribute's final name."""

    def __init__(self, bundle: Bundle, mod: Module):
        self.bundle, self.mod = bundle, mod
        self.scopes: list[Scope] = []

    # -- scope bookkeeping --

    def _scope_for(self, node) -> Scope:
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            local = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
            return Scope("function", local, {}, set())
        local, aliases, declared = set(), {}, set()
        if isinstance(node, (*FUNCTIONS, ast.Lambda)):
            local |= _arg_names(node.args)
            body = node.body if isinstance(node, FUNCTIONS) else [node.body]
        else:
            body = node.body
        for sub in _walk_scope(body):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                local.add(sub.id)
            elif isinstance(sub, (*FUNCTIONS, ast.ClassDef)):
                local.add(sub.name)
            elif isinstance(sub, ast.ExceptHandler) and sub.name:
                local.add(sub.name)
            elif isinstance(sub, (ast.Global, ast.Nonlocal)):
                declared |= set(sub.names) if isinstance(sub, ast.Global) else set()
                local -= set(sub.names)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                for alias in sub.names:
                    name = alias.asname or alias.name.split(".")[0]
                    target = self._import_resolution(sub, alias)
                    if target is None:
                        local.add(name)
                    else:
                        aliases[name] = target
        for n in _walk_scope(body):
            if isinstance(n, ast.Nonlocal):
                local -= set(n.names)
        local -= declared
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        return Scope(kind, local, aliases, declared)

    def _import_resolution(self, node, alias):
        """For an import of a bundled module inside a function: what the bound name resolves to."""
        if isinstance(node, ast.Import):
            if not is_bundled(alias.name):
                return None
            return ("module", alias.name if alias.asname else alias.name.split(".")[0])
        if node.level or not node.module or not is_bundled(node.module):
            return None
        sub = f"{node.module}.{alias.name}"
        if sub in self.bundle.modules and self.bundle.modules[node.module].is_package and \
                alias.name not in self.bundle.modules[node.module].bindings:
            return ("module", sub)
        found = self.bundle.resolve(node.module, alias.name)
        if found is None:
            raise BundleError(f"cannot bundle: {self.mod.where(node)}: {node.module} has no {alias.name}")
        return found

    def lookup(self, name: str):
        """("local",) or a resolution ("name", final) / ("module", m) / None (a builtin)."""
        innermost = True
        for scope in reversed(self.scopes):
            if scope.kind == "class" and not innermost:
                innermost = False
                continue
            innermost = False
            if name in scope.declared_global:
                break
            if name in scope.aliases:
                return scope.aliases[name]
            if name in scope.local:
                return ("local",)
        return self.bundle.resolve(self.mod.name, name)

    def _in_scope(self, node):
        self.scopes.append(self._scope_for(node))
        try:
            return self.generic_visit(node)
        finally:
            self.scopes.pop()

    # -- visitors --

    def _visit_def(self, node):
        # Decorators, defaults and bases run in the enclosing scope; the body in the new one.
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        if isinstance(node, FUNCTIONS):
            node.args.defaults = [self.visit(d) for d in node.args.defaults]
            node.args.kw_defaults = [self.visit(d) if d else d for d in node.args.kw_defaults]
            _strip_annotations(node)
        else:
            node.bases = [self.visit(b) for b in node.bases]
            for k in node.keywords:
                k.value = self.visit(k.value)
        if not self.scopes or node.name in self.scopes[-1].declared_global:
            found = self.bundle.resolve(self.mod.name, node.name)
            if found and found[0] == "name":
                node.name = found[1]
        self.scopes.append(self._scope_for(node))
        try:
            node.body = [s for s in (self.visit(s) for s in node.body) if s is not None]
            if not node.body:
                node.body = [ast.Pass()]
            if self.scopes[-1].store_globals:
                node.body.insert(0, ast.Global(names=sorted(self.scopes[-1].store_globals)))
        finally:
            self.scopes.pop()
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_def

    def visit_Lambda(self, node):
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        self.scopes.append(self._scope_for(node))
        try:
            node.body = self.visit(node.body)
        finally:
            self.scopes.pop()
        return node

    def _visit_comp(self, node):
        first = node.generators[0]
        first.iter = self.visit(first.iter)
        self.scopes.append(self._scope_for(node))
        try:
            first.target = self.visit(first.target)
            first.ifs = [self.visit(i) for i in first.ifs]
            for g in node.generators[1:]:
                self.visit(g)
            for attr in ("elt", "key", "value"):
                if hasattr(node, attr):
                    setattr(node, attr, self.visit(getattr(node, attr)))
        finally:
            self.scopes.pop()
        return node

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _visit_comp

    def visit_Import(self, node):
        keep = [a for a in node.names if not is_bundled(a.name)]
        if len(keep) == len(node.names):
            return self._rename_external(node)
        if keep:
            raise BundleError(f"cannot bundle: {self.mod.where(node)}: bundled and other modules in one import")
        return None

    def visit_ImportFrom(self, node):
        if node.module and is_bundled(node.module):
            return None
        if node.level:
            raise BundleError(f"cannot bundle: {self.mod.where(node)}: relative import")
        return self._rename_external(node)

    def _rename_external(self, node):
        return node  # top-level ones get their final names in Bundle._external_import; nested ones are local

    def _store_global(self, node, module: str, attr: str, final: str) -> None:
        """`module.attr = v` (a patch, e.g. around a call) is an assignment to that global in the bundle."""
        functions = [s for s in self.scopes if s.kind == "function"]
        if not functions:
            return
        if final in functions[-1].local:
            raise BundleError(f"cannot bundle: {self.mod.where(node)}: assigns {module}.{attr} in a function that "
                              f"has a local named {final}; rename the local")
        functions[-1].declared_global.add(final)
        functions[-1].store_globals.add(final)

    def visit_Global(self, node):
        names = []
        for n in node.names:
            found = self.bundle.resolve(self.mod.name, n)
            names.append(found[1] if found and found[0] == "name" else n)
        node.names = names
        return node

    def visit_Name(self, node):
        found = self.lookup(node.id)
        if found is None or found[0] == "local":
            return node
        if found[0] == "module":
            raise BundleError(f"cannot bundle: {self.mod.where(node)}: module {found[1]} used as a value "
                              f"({node.id}); use its attributes ({node.id}.NAME) or import the names")
        node.id = found[1]
        return node

    def visit_Attribute(self, node):
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base)
            base = base.value
        if isinstance(base, ast.Name):
            found = self.lookup(base.id)
            if found is not None and found[0] == "module":
                module = found[1]
                for i, attr_node in enumerate(reversed(chain)):
                    sub = f"{module}.{attr_node.attr}"
                    if sub in self.bundle.modules and attr_node.attr not in self.bundle.modules[module].bindings:
                        module = sub
                        continue
                    target = self.bundle.resolve(module, attr_node.attr)
                    if target is None:
                        raise BundleError(f"cannot bundle: {self.mod.where(node)}: {module} has no "
                                          f"{attr_node.attr}")
                    if target[0] == "module":
                        module = target[1]
                        continue
                    if not isinstance(attr_node.ctx, ast.Load):
                        self._store_global(node, module, attr_node.attr, target[1])
                    replacement = ast.copy_location(ast.Name(target[1], attr_node.ctx), attr_node)
                    rest = list(reversed(chain))[i + 1:]
                    out = replacement
                    for outer in rest:
                        outer.value = out
                        out = outer
                    return out
                raise BundleError(f"cannot bundle: {self.mod.where(node)}: module {module} used as a value")
        node.value = self.visit(node.value)
        return node


def _strip_annotations(node) -> None:
    """Argument and return annotations go (they are never evaluated: the bundle has `annotations` future)."""
    args = node.args
    for a in args.posonlyargs + args.args + args.kwonlyargs + [x for x in (args.vararg, args.kwarg) if x]:
        a.annotation = None
    node.returns = None
