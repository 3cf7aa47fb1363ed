"""Handle tables: encoding, kinds, stale/forged/foreign handles, limits, threads, teardown."""

from __future__ import annotations

import threading

import pytest

from hvjit.errors import InvalidHandleError, ObjectDestroyedError
from hvjit.handles import (
    GENERATION_BITS,
    MAGIC_BITS,
    NIL_HANDLE,
    SLOT_BITS,
    HandleTable,
)


def test_handles_are_nonzero_distinct_and_fit_int64():
    table = HandleTable()
    handles = [table.insert(object(), "thing") for _ in range(100)]
    assert NIL_HANDLE not in handles
    assert len(set(handles)) == 100
    assert all(0 < h < 2**63 for h in handles)
    assert SLOT_BITS + GENERATION_BITS + MAGIC_BITS == 63
    # Slots start at 1 and count up.
    assert [h & ((1 << SLOT_BITS) - 1) for h in handles[:3]] == [1, 2, 3]


def test_lookup_returns_object_and_checks_kind():
    table = HandleTable()
    obj = object()
    handle = table.insert(obj, "vm")
    assert table.lookup(handle, "vm") is obj
    with pytest.raises(InvalidHandleError, match="names a 'vm', not a 'vcpu'"):
        table.lookup(handle, "vcpu")
    assert table.lookup(handle, "vm") is obj  # a refused lookup changes nothing


@pytest.mark.parametrize(
    "bad",
    [0, -1, 1, 2**63, 1.0, "1", None, True],
    ids=["nil", "negative", "bare-slot", "too-big", "float", "str", "none", "bool"],
)
def test_forged_handles_are_refused(bad):
    table = HandleTable()
    table.insert("x", "k")
    with pytest.raises(InvalidHandleError):
        table.lookup(bad, "k")
    assert len(table) == 1


def test_forged_slot_beyond_table_is_refused():
    table = HandleTable()
    handle = table.insert("x", "k")
    forged = handle + 5  # same magic and generation, an unused slot
    with pytest.raises(InvalidHandleError, match="no such slot"):
        table.lookup(forged, "k")


def test_foreign_handle_refused_even_when_slot_and_generation_match():
    first, second = HandleTable(), HandleTable()
    h1 = first.insert("mine", "k")
    h2 = second.insert("theirs", "k")
    low_bits = (1 << (SLOT_BITS + GENERATION_BITS)) - 1
    assert h1 & low_bits == h2 & low_bits  # same slot, same generation
    with pytest.raises(InvalidHandleError, match="does not belong"):
        second.lookup(h1, "k")
    assert second.lookup(h2, "k") == "theirs"


def test_stale_handle_of_reused_slot_is_refused():
    table = HandleTable()
    old = table.insert("old", "k")
    table.release(old)
    new = table.insert("new", "k")
    assert new & ((1 << SLOT_BITS) - 1) == old & ((1 << SLOT_BITS) - 1)  # slot reused
    assert new != old
    with pytest.raises(InvalidHandleError, match="stale"):
        table.lookup(old, "k")
    with pytest.raises(InvalidHandleError):
        table.release(old)
    assert table.lookup(new, "k") == "new"
    assert len(table) == 1


def test_free_list_reuses_slots_first_in_first_out():
    table = HandleTable()
    handles = [table.insert(i, "k") for i in range(4)]
    slot = lambda h: h & ((1 << SLOT_BITS) - 1)  # noqa: E731
    table.release(handles[2])
    table.release(handles[0])
    assert [slot(table.insert("a", "k")), slot(table.insert("b", "k"))] == [3, 1]
    assert slot(table.insert("c", "k")) == 5  # free list empty: a new slot


def test_table_limit_refuses_and_changes_nothing():
    table = HandleTable(max_handles=3)
    handles = [table.insert(i, "k") for i in range(3)]
    with pytest.raises(InvalidHandleError, match="full"):
        table.insert("one too many", "k")
    assert len(table) == 3
    table.release(handles[0])
    table.insert("fits again", "k")
    assert len(table) == 3


@pytest.mark.parametrize("bad", [0, -5, 1 << SLOT_BITS])
def test_table_size_must_fit_the_slot_bits(bad):
    with pytest.raises(ValueError):
        HandleTable(max_handles=bad)


def test_retain_release_counts_and_destructor_runs_once_at_zero():
    table = HandleTable()
    calls = []
    handle = table.insert("x", "k", lambda: calls.append("gone"))
    assert table.retain(handle, "k") == 2
    assert table.release(handle, "k") == 1
    assert calls == []
    assert table.release(handle, "k") == 0
    assert calls == ["gone"]
    with pytest.raises(InvalidHandleError):
        table.release(handle, "k")
    assert calls == ["gone"]


def test_release_with_wrong_kind_changes_nothing():
    table = HandleTable()
    handle = table.insert("x", "k")
    with pytest.raises(InvalidHandleError):
        table.release(handle, "other")
    assert table.reference_count(handle, "k") == 1


def test_free_ignores_reference_count():
    table = HandleTable()
    calls = []
    handle = table.insert("x", "k", lambda: calls.append(1))
    table.retain(handle)
    assert table.free(handle, "k") == "x"
    assert calls == [1] and len(table) == 0


def test_reserved_handle_is_filled_by_set_object():
    table = HandleTable()
    handle = table.insert(None, "vm")
    calls = []
    table.set_object(handle, "vm", "the vm", lambda: calls.append(1))
    assert table.lookup(handle, "vm") == "the vm"
    with pytest.raises(InvalidHandleError):
        table.set_object(handle, "vcpu", "other")
    table.release(handle)
    assert calls == [1]


def test_close_runs_destructors_in_reverse_creation_order_even_after_reuse():
    table = HandleTable()
    order = []
    a = table.insert("a", "k", lambda: order.append("a"))
    table.insert("b", "k", lambda: order.append("b"))
    table.release(a)
    order.clear()
    # "c" reuses a's slot (slot 1) but is the newest: it goes first.
    table.insert("c", "k", lambda: order.append("c"))
    table.insert("d", "k", lambda: order.append("d"))
    table.close()
    assert order == ["d", "c", "b"]
    assert len(table) == 0 and table.closed
    table.close()  # idempotent
    assert order == ["d", "c", "b"]
    with pytest.raises(ObjectDestroyedError):
        table.insert("e", "k")


def test_close_runs_every_destructor_and_reraises_the_first_failure():
    table = HandleTable()
    ran = []

    def fail(tag):
        ran.append(tag)
        raise RuntimeError(tag)

    table.insert("a", "k", lambda: fail("a"))
    table.insert("b", "k", lambda: ran.append("b"))
    table.insert("c", "k", lambda: fail("c"))
    with pytest.raises(RuntimeError, match="c") as info:
        table.close()
    assert ran == ["c", "b", "a"]
    assert "1 more destructor" in info.value.__notes__[0]


def test_handles_and_items_list_live_entries_by_kind_in_creation_order():
    table = HandleTable()
    h1 = table.insert("one", "a")
    table.insert("two", "b")
    h3 = table.insert("three", "a")
    assert table.handles("a") == [h1, h3]
    assert [obj for _, obj in table.items()] == ["one", "two", "three"]
    assert table.kind_of(h3) == "a"


def test_threads_inserting_and_releasing_keep_counts_exact():
    table = HandleTable(max_handles=100_000)
    destroyed = []
    lock = threading.Lock()
    kept: list[list[int]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def destructor():
        with lock:
            destroyed.append(1)

    def worker(index):
        barrier.wait()
        for i in range(2000):
            handle = table.insert((index, i), "k", destructor)
            table.retain(handle, "k")
            table.release(handle, "k")
            if i % 2:
                table.release(handle, "k")
            else:
                kept[index].append(handle)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(destroyed) == 8 * 1000
    assert len(table) == 8 * 1000
    for index, handles in enumerate(kept):
        assert [table.lookup(h, "k")[0] for h in handles] == [index] * 1000
        assert all(table.reference_count(h) == 1 for h in handles)
