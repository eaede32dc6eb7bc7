"""fxopt.passinfra.collector: collections during a compile scan only the compile's objects."""

from __future__ import annotations

import gc
import threading
import weakref

import torch

import fxopt
from fxopt.passinfra.collector import collect_young, young_objects_only


class _Node:
    def __init__(self) -> None:
        self.other: object = self


def test_a_cycle_made_inside_is_freed_and_older_objects_are_given_back() -> None:
    before = _Node()  # alive before the block: frozen while it runs
    with young_objects_only():
        assert gc.get_freeze_count() > 0
        made = _Node()
        ref = weakref.ref(made)
        del made
        collect_young()
        assert ref() is None
    assert gc.get_freeze_count() == 0
    assert gc.is_tracked(before)


def test_nested_blocks_give_the_objects_back_once_at_the_outermost_end() -> None:
    # (a frozen object freed by its reference count leaves the count: it can only go down while frozen)
    with young_objects_only():
        frozen = gc.get_freeze_count()
        with young_objects_only():
            assert 0 < gc.get_freeze_count() <= frozen  # not frozen twice
        assert 0 < gc.get_freeze_count() <= frozen  # the inner end gave nothing back
    assert gc.get_freeze_count() == 0


def test_another_owners_freeze_is_left_alone() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with young_objects_only():
            collect_young()  # a full collection: nothing of ours is frozen
        assert 0 < gc.get_freeze_count() <= frozen  # still frozen (a frozen object freed by refcount leaves the count)
    finally:
        gc.unfreeze()


def test_threads_in_blocks_at_once_leave_nothing_frozen() -> None:
    # the first thread in froze; it leaves first, and the objects stay frozen until the last one leaves
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def first() -> None:
        with young_objects_only():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with young_objects_only():
            second_in.set()
            first_out.wait(5)
            seen.append(gc.get_freeze_count())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and seen[0] > 0
    assert gc.get_freeze_count() == 0


def test_a_failing_compile_leaves_nothing_frozen() -> None:
    try:
        fxopt.compile(torch.nn.Linear(4, 4), "cpu", example_inputs=(torch.randn(2, 5),))
    except fxopt.FxoptError:
        pass
    else:  # pragma: no cover - the shapes do not match
        raise AssertionError("expected an InputError")
    assert gc.get_freeze_count() == 0


def test_garbage_from_before_the_block_is_freed_when_it_begins() -> None:
    made = _Node()
    ref = weakref.ref(made)
    del made  # a cycle: only a collection frees it
    with young_objects_only():
        assert ref() is None


def test_a_freeze_made_inside_the_block_by_other_code_is_kept() -> None:
    try:
        with young_objects_only():
            _ = [_Node() for _ in range(100)]
            gc.freeze()  # other code (an eval_fn) freezes too
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()



def test_a_short_block_may_skip_the_first_full_collection() -> None:
    made = _Node()
    ref = weakref.ref(made)
    del made
    with young_objects_only(collect_first=False):
        assert ref() is not None  # frozen, not collected: it waits for a collection after the block
        collect_young()
        assert ref() is not None
    gc.collect()
    assert ref() is None


def test_a_compile_collects_older_garbage_first_unless_a_collection_ran_since_the_last_and_the_model_is_small(monkeypatch) -> None:
    from fxopt.passinfra import collector

    model, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    seen: list[bool] = []
    ref: list[weakref.ref] = []
    monkeypatch.setattr(fxopt.compiler, "_trace", _recording(fxopt.compiler._trace, lambda: seen.append(ref[0]() is None)))

    def compile_beside_garbage(threshold: int, collect_before: bool) -> bool:
        monkeypatch.setattr(collector, "COLLECT_FIRST_MIN_BYTES", threshold)
        if collect_before:
            gc.collect()  # a full collection since the last compile: an earlier compile's garbage is gone
        made = _Node()
        ref[:], seen[:] = [weakref.ref(made)], []
        del made
        fxopt.compile(model, "cpu", example_inputs=(x,), export=False)
        return seen[0]

    small, large = 1 << 40, 0  # the Linear's 80 bytes against the threshold
    assert compile_beside_garbage(small, collect_before=True) is False  # left to the next full collection
    gc.collect()
    assert ref[0]() is None
    fxopt.compile(model, "cpu", example_inputs=(x,), export=False)  # no collection after it
    assert compile_beside_garbage(small, collect_before=False) is True  # compiles in a loop: the last one's garbage is freed
    assert compile_beside_garbage(large, collect_before=True) is True  # a large model: its memory matters, always


def _recording(fn, probe):
    def wrapped(*args, **kwargs):
        probe()
        return fn(*args, **kwargs)

    return wrapped


def test_an_export_frees_the_clean_ups_cycles_at_once_only_for_a_large_model(monkeypatch) -> None:
    import fxopt.backends.onnx as onnx_backend

    calls: list[int] = []
    monkeypatch.setattr(onnx_backend, "collect_young", lambda: calls.append(1))
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), torch.randn(2, 4)
    for threshold, keep_out, expected in ((1 << 40, False, []), (0, False, [1]), (1 << 40, True, [1])):
        monkeypatch.setattr(onnx_backend, "LEAN_MIN_BYTES", threshold)
        calls.clear()
        onnx_backend.export_onnx(model.eval(), (x,), keep_weights_out=keep_out)
        assert calls == expected, (threshold, keep_out)
