"""The mutation suite's machinery: plausible bugs as runtime patches, and who kills them.

A `Mutant` is one plausible bug in the library, applied at run time (nothing on disk
changes) and undone afterwards, plus the proofs (pytest node ids) that must catch it.
Most mutants are *source patches*: the target function's source with one snippet
replaced (`old` must occur exactly once, so a mutant whose code has moved fails loudly
instead of silently testing nothing), recompiled in its module's namespace and put in
place of the original everywhere it is bound (`from m import f` copies included).

`run(mutant)` runs only the mutant's proofs, in this process (a nested pytest session,
as pytest's own `pytester.inline_run` does), with the patch applied for that session;
the mutant is killed when at least one proof fails on an assertion (a crash is not a
kill: a plausible bug computes wrong numbers, it does not raise).

Mutant lists live beside this file, one per method (`m_<method>.py`, each a `MUTANTS`
list); `test_mutants.py` runs them all.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Patch:
    """Replace `old` by `new` in the source of `target` ("package.module:Qual.name")."""

    target: str
    old: str
    new: str

    def _resolve(self):
        module_name, _, qualname = self.target.partition(":")
        module = import_module(module_name)
        owner, parts = module, qualname.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part)
        return module, owner, parts[-1]

    @contextlib.contextmanager
    def applied(self):
        module, owner, name = self._resolve()
        original = inspect.getattr_static(owner, name)
        func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
        func = getattr(func, "func", func)  # functools.cached_property keeps the function in .func
        func = func.fget if isinstance(func, property) else func
        source = textwrap.dedent(inspect.getsource(func))
        count = source.count(self.old)
        if count != 1:
            raise AssertionError(f"mutant of {self.target}: {self.old!r} occurs {count} times in its source "
                                 "(the code changed: update the mutant)")
        namespace: dict = {}
        code = compile(source.replace(self.old, self.new), f"<mutant of {self.target}>", "exec")
        exec(code, module.__dict__, namespace)  # globals: the module's own; the def lands in `namespace`
        mutated = namespace[name]
        if isinstance(original, (staticmethod, classmethod)) and not isinstance(mutated, type(original)):
            mutated = type(original)(mutated)
        if isinstance(original, property) and not isinstance(mutated, property):
            mutated = property(mutated)
        if hasattr(original, "attrname"):  # cached_property (its decorator may be in the source)
            import functools

            if not hasattr(mutated, "attrname"):
                mutated = functools.cached_property(mutated)
            mutated.__set_name__(owner, name)
        bindings = [(owner, name, original)]
        if owner is module:  # functions imported by name elsewhere: patch those bindings too
            for other in _our_modules():
                namespace_of = getattr(other, "__dict__", None)
                if other is module or not isinstance(namespace_of, dict):
                    continue
                for attr, value in list(namespace_of.items()):
                    if value is original:
                        bindings.append((other, attr, original))
                    elif type(value) is dict:  # registries: {"a sepia photo": sepia, ...}
                        bindings += [(value, key, original) for key, v in list(value.items()) if v is original]
        for where, attr, _ in bindings:
            _bind(where, attr, mutated)
        loaded = set(sys.modules)
        try:
            yield
        finally:
            for where, attr, value in bindings:
                _bind(where, attr, value)
            # Modules first imported while the mutant was active bound the mutated
            # function (`from m import f`): put the original back there too, or the
            # bug would leak into every later test of the session. Only those: the
            # modules loaded before had their bindings collected above (scanning every
            # module's namespace again cost the suite about a minute).
            for other in _our_modules(exclude=loaded):
                namespace_of = getattr(other, "__dict__", None)
                if isinstance(namespace_of, dict):
                    for attr, value in list(namespace_of.items()):
                        if value is mutated:
                            setattr(other, attr, original)
                        elif type(value) is dict:
                            for key, v in list(value.items()):
                                if v is mutated:
                                    value[key] = original


def _our_modules(exclude: set | frozenset = frozenset()) -> list:
    """The loaded modules of this repository (the package, tests, benchmarks), but those named
    in `exclude`: only they can hold a name bound to one of its functions
    (`from diffstream.x import f`); scanning the ~3,000 third-party modules too cost the
    suite about a minute."""
    root = str(ROOT)
    return [m for name, m in list(sys.modules.items())
            if name not in exclude and str(getattr(m, "__file__", None) or "").startswith(root)]


def _bind(where, name, value) -> None:
    """Set attribute `name` of a module/class, or key `name` of a registry dict."""
    if type(where) is dict:
        where[name] = value
    else:
        setattr(where, name, value)


@dataclass(frozen=True)
class Mutant:
    """One plausible bug and the proofs that must catch it.

    Attributes:
        name: short id (shown in the suite's parametrisation).
        bug: what the bug is, in words.
        patches: the source patches that make it (applied together).
        killers: pytest node ids, relative to the repository root, of the proofs that
            must fail under it.
        harmless: if set, why the mutant cannot be caught because it changes nothing
            (documented and skipped, never silently dropped).
        raises: the bug is one that raises (e.g. a refused update): then a proof that
            fails on that exception kills it too.
    """

    name: str
    bug: str
    patches: tuple[Patch, ...]
    killers: tuple[str, ...]
    harmless: str | None = None
    raises: bool = False

    @contextlib.contextmanager
    def applied(self):
        with contextlib.ExitStack() as stack:
            for patch in self.patches:
                stack.enter_context(patch.applied())
            yield


def mutant(name: str, bug: str, killers, *patches: Patch, harmless: str | None = None,
           raises: bool = False) -> Mutant:
    """Shorthand used by the mutant lists: `mutant(name, bug, killers, Patch(...), ...)`."""
    killers = (killers,) if isinstance(killers, str) else tuple(killers)
    return Mutant(name, bug, tuple(patches), killers, harmless, raises)


class _Recorder:
    """A pytest plugin that records the outcomes of a nested session (`run` applies the mutant)."""

    def __init__(self, m: Mutant):
        self.mutant = m
        self.killed_by: list[str] = []  # proofs that failed on an assertion
        self.crashed: list[str] = []  # proofs that raised something else (not a kill)
        self.passed: list[str] = []
        self.errors: list[str] = []  # setup/collection errors
        self.skipped: list[str] = []  # proofs that could not run here (a missing browser, say)

    def pytest_runtest_makereport(self, item, call):
        if call.excinfo is not None and call.excinfo.errisinstance(_skip_types()):
            self.skipped.append(item.nodeid)
            return
        if call.when != "call":
            if call.excinfo is not None:
                self.errors.append(f"{item.nodeid} ({call.when}): {call.excinfo.typename}")
            return
        if call.excinfo is None:
            self.passed.append(item.nodeid)
        elif call.excinfo.errisinstance((AssertionError, _failed_type())):
            self.killed_by.append(item.nodeid)
        else:
            self.crashed.append(f"{item.nodeid}: {call.excinfo.typename}: {str(call.excinfo.value)[:200]}")

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append(f"collecting {report.nodeid}")
        elif report.skipped:  # a module-level importorskip
            self.skipped.append(report.nodeid)

    @property
    def unrun(self) -> bool:
        """Every proof was skipped (its browser or library is missing here): no verdict."""
        return bool(self.skipped) and not (self.killed_by or self.passed or self.crashed)

    @property
    def killed(self) -> bool:
        """A kill: some proof failed on an assertion (not on an exception the broken code
        raised, unless the mutant's bug is one that raises)."""
        return bool(self.killed_by) or (self.mutant.raises and bool(self.crashed))

    def summary(self) -> str:
        return (f"{self.mutant.name}: killed by {self.killed_by or 'nothing'}; passed {self.passed}; "
                f"crashed {self.crashed}; errors {self.errors}; skipped {self.skipped}")


def _failed_type():
    from _pytest.outcomes import Failed

    return Failed


def _skip_types():
    from _pytest.outcomes import Skipped

    return (Skipped,)


def node_path(killer: str) -> str:
    """A killer id relative to the repository root as an absolute node id."""
    path, sep, rest = killer.partition("::")
    return str(ROOT / path) + sep + rest


def run(m: Mutant) -> _Recorder:
    """Run the mutant's proofs, in this process, with the mutant applied; return what happened."""
    import pytest

    recorder = _Recorder(m)
    # no:unraisableexception: that plugin runs a full gc.collect() twice per session, which
    # late in the suite (a large heap) cost seconds per mutant; the outer session keeps it.
    # Applied out here, not in a hook of the nested session: a snippet that no longer
    # matches the source raises here and fails the mutant's test with the reason,
    # instead of ending the nested session before any proof ran ("survived", no errors).
    with m.applied():
        pytest.main([*map(node_path, m.killers), "-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                     "--no-header", "-W", "ignore::pytest.PytestAssertRewriteWarning"], plugins=[recorder])
    return recorder


def all_mutants() -> list[Mutant]:
    """Every mutant of every mechanism: the `MUTANTS` lists of this folder's `m_*.py` files."""
    import importlib.util

    found = []
    for path in sorted(Path(__file__).parent.glob("m_*.py")):
        spec = importlib.util.spec_from_file_location(f"mutants_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found.extend(module.MUTANTS)
    names = [m.name for m in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"mutant names used twice: {duplicates}"
    return found


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="List the mutation suite (run it with pytest tests/mutants).")
    parser.add_argument("--list", action="store_true", help="print mutant | bug | killers as a markdown table")
    parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    rows = all_mutants()
    print("| mutant | bug | killed by |\n|---|---|---|")
    for m in rows:
        killers = ", ".join(f"`{k.split('::')[-1]}`" for k in m.killers)
        print(f"| `{m.name}` | {m.bug} | {killers if not m.harmless else 'harmless: ' + m.harmless} |")
    print(f"\n{len(rows)} mutants")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
