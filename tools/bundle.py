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

from tools.fold import Folder
from tools.scopes import FUNCTIONS, PACKAGES, BundleError, Renamer, _arg_names, is_bundled

ROOT = Path(__file__).resolve().parent.parent


def module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


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
