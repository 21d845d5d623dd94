"""Scopes for the bundler: the names a function binds, and the rewrite of one module into the bundle's one
namespace (globals to their final names, bundled imports resolved, `module.attr` to the attribute's name)."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from core.errors import UserError

PACKAGES = ("core", "backend_torch")
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
          ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


class BundleError(UserError):
    pass


def is_bundled(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


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
