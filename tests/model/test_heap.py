"""The collector around loading (model/memory/heap.py): off inside, restored and frozen after."""

from __future__ import annotations

import gc

import pytest

from model.memory.heap import loading


@pytest.fixture(autouse=True)
def collector_on():
    gc.enable()
    yield
    gc.enable()
    gc.unfreeze()  # the rest of the suite runs with an ordinary heap


def test_collector_is_off_inside_and_what_was_made_is_frozen():
    frozen = gc.get_freeze_count()
    with loading():
        assert not gc.isenabled()
        made = [[i] for i in range(5000)]  # lists are tracked by the collector
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + len(made)


def test_nested_uses_leave_the_collector_to_the_outermost():
    with loading():
        with loading():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_error_inside_still_restores_the_collector():
    with pytest.raises(RuntimeError):
        with loading():
            raise RuntimeError("load failed")
    assert gc.isenabled()


def test_collect_first_leaves_no_cycle_frozen():
    class Node:
        pass

    with loading(collect=True):
        a, b = Node(), Node()
        a.other, b.other = b, a
        import weakref

        gone = weakref.ref(a)
        del a, b
    assert gone() is None  # collected before the freeze, not kept for good


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    with loading():
        pass
    assert not gc.isenabled()


def test_generate_loads_with_the_collector_paused(tiny_model_dir, tmp_path, monkeypatch):
    """`musicbridge generate` loads through `loading`: the engine is built with the collector
    off, and the collector is back on for the rest of the run."""
    from bridge.cli import main
    from model.engine import Engine

    seen = []
    real = Engine.load.__func__

    def spy(cls, *a, **k):
        seen.append(gc.isenabled())
        return real(cls, *a, **k)

    monkeypatch.setattr(Engine, "load", classmethod(spy))
    out = tmp_path / "a.wav"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--seconds", "0.5",
                 "--seed", "1", "--out", str(out)]) == 0
    assert seen == [False]
    assert gc.isenabled() and out.stat().st_size > 44
