"""The bundler's fold (tools/fold.py, fold_params.py) on small sources: what it may drop, what it must keep."""

from __future__ import annotations

import ast
import textwrap

from tools.fold import Folder
from tools.fold_params import constant_params


def fold(source: str, values=None, classes=None, flat=False, params=False) -> str:
    folder = Folder(dict(values or {}), classes)
    tree = ast.parse(textwrap.dedent(source))
    if params:
        folder.known_params = constant_params(tree, folder)
    folder.flat = flat
    return ast.unparse(folder.visit(tree))


CHECKS = """
class Spec:
    def __post_init__(self):
        for name in ("a", "b"):
            if getattr(self, name) < 0:
                raise ValueError(name)
        if self.a > 5:
            raise ValueError("a")
        if self.open < 1:
            raise ValueError("open")
        if self.a > 1:
            self.note = "big"
"""


def test_checks_the_config_passes_go_and_the_rest_stays():
    out = fold(CHECKS, {"spec.a": 3, "spec.b": 0}, {"Spec": "spec"})
    assert "getattr" not in out and "ValueError('a')" not in out  # passed at export: dropped
    assert "self.open < 1" in out  # a key the script's environment may change: kept
    assert "self.a > 1" in out  # not a check: the instance may be a variant with other values, so kept


def test_a_check_the_config_fails_is_kept_and_other_classes_untouched():
    out = fold(CHECKS, {"spec.a": 9, "spec.b": 0}, {"Spec": "spec"})
    assert "self.a > 5" in out
    assert "getattr" in fold(CHECKS, {"spec.a": 3, "spec.b": 0}, {"Other": "spec"})


def test_flat_module_constants_and_arithmetic_fold_unless_rebound():
    src = """
    LIMIT = 4
    SHADOWED = 1
    def f(x):
        if LIMIT * 2 > 7:
            return 1
        return 2
    def g(SHADOWED):
        if SHADOWED == 1:
            return 0
    """
    out = fold(src, flat=True)
    assert "LIMIT * 2" not in out and "SHADOWED == 1" in out
    assert "LIMIT * 2" in fold(src)  # only in the pass over the one flat module


def test_a_parameter_every_call_fixes_folds_the_locals_made_from_it():
    src = """
    def score(x, extra=None):
        on = extra is not None
        if on:
            return x + extra
        return x
    def main():
        return score(1, extra=None) + score(2)
    """
    assert "return x + extra" not in fold(src, params=True)
    assert "return x + extra" in fold(src.replace("score(2)", "score(2, extra=1)"), params=True)


def test_what_init_fixes_folds_in_the_methods_and_what_a_caller_passes_on():
    src = """
    class Backend:
        def __init__(self, train, quiet=None):
            self.schedule = train.depth_schedule
            self.quiet = False if quiet is None else quiet
            self.steps = 0
        def step(self):
            self.steps += 1
            if self.quiet:
                return 'quiet'
            return self._variant(self.schedule)
        def _variant(self, schedule):
            if schedule:
                return 'staged'
            return 'flat'
        def steps_taken(self):
            if self.steps:
                return self.steps
    class Other:
        def _variant(self, schedule):
            return schedule
    def main(cfg):
        return Backend(cfg.train, quiet=False).step()
    """
    tree = ast.parse(textwrap.dedent(src))
    folder = Folder({"cfg.train.depth_schedule": ""})
    folder.known_params = constant_params(tree, folder)
    folder.flat = True
    out = ast.unparse(folder.visit(tree))
    assert "'quiet'" not in out and "'staged'" not in out  # fixed by __init__, and passed on to self._variant
    assert "if self.steps:" in out  # bound twice (+= in step): not a constant


def test_a_method_name_called_on_another_object_is_not_folded():
    src = """
    class A:
        def run(self):
            return self.pick(1)
        def pick(self, n):
            if n == 1:
                return 'one'
            return 'other'
    class B:
        def pick(self, n):
            return n
    def main(obj):
        return A().run() + obj.pick(2)
    """
    assert "'other'" in fold(src, params=True)  # obj.pick may be A.pick with n = 2
    assert "'other'" not in fold(src.replace("obj.pick(2)", "B().run2()"), params=True)
