"""The mutation suite: every plausible bug in `m_*.py` must be caught by the proofs it names.

    python -m pytest tests/mutants -q          # all mutants
    python -m pytest tests/mutants -q -k rcfg  # some
    python tests/mutants/mutation.py --list    # the table: mutant, bug, killers

A surviving mutant is a missing proof (or a harmless change: then it says why and is
skipped here, with the reason shown).
"""

import pytest

import mutation

MUTANTS = mutation.all_mutants()


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """What the suite built before the mutants run (imported modules, session models) is
    alive for good: frozen out of the collections each nested session triggers (as the
    root conftest's `freeze_heap` does at import)."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.mark.mutants
@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_killed(m):
    if m.harmless:
        pytest.skip(f"harmless: {m.harmless}")
    recorder = mutation.run(m)
    assert not recorder.errors, recorder.summary()
    if recorder.unrun:
        pytest.skip(f"its proofs were skipped here: {recorder.skipped}")
    assert recorder.killed, "survived: " + recorder.summary()


def test_patches_apply_and_restore():
    """Every mutant's snippet is found exactly once, and leaving the patch restores the code."""
    import inspect

    for m in MUTANTS:
        for patch in m.patches:
            module, owner, name = patch._resolve()
            before = inspect.getattr_static(owner, name)
            with patch.applied():
                assert inspect.getattr_static(owner, name) is not before, m.name
            assert inspect.getattr_static(owner, name) is before, m.name
