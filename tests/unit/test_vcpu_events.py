"""The x86 rules for events, without KVM: which exceptions push an error code, and what is
delivered when an exception arises while another event is being delivered."""

import pytest

from hvjit.errors import InjectionError
from hvjit.vcpu_events import (
    TRIPLE_FAULT,
    ExceptionClass,
    ExceptionEvent,
    InterruptEvent,
    NmiEvent,
    combine,
    exception_class,
    exception_event,
)

DF = ExceptionEvent(8, 0)


def exc(vector, code=None):
    return ExceptionEvent(vector, code)


@pytest.mark.parametrize("event,cls", [
    (exc(14, 0), ExceptionClass.PAGE_FAULT), (exc(20), ExceptionClass.PAGE_FAULT),
    *[(exc(v, 0 if v != 0 else None), ExceptionClass.CONTRIBUTORY) for v in (0, 10, 11, 12, 13)],
    *[(exc(v), ExceptionClass.BENIGN) for v in (1, 3, 4, 5, 6, 7, 9, 16, 18, 19)],
    (InterruptEvent(0x40, soft=True), ExceptionClass.BENIGN), (InterruptEvent(8), ExceptionClass.BENIGN),
    (NmiEvent(), ExceptionClass.BENIGN),
])
def test_exception_classes_follow_the_sdm(event, cls):
    assert exception_class(event) is cls


CONTRIBUTORY = [exc(0), exc(10, 0), exc(11, 0), exc(12, 0), exc(13, 0)]
BENIGN = [exc(1), exc(6), exc(7), exc(16), InterruptEvent(0x30), InterruptEvent(0x80, soft=True), NmiEvent()]
PF = exc(14, 2)


@pytest.mark.parametrize("first", CONTRIBUTORY)
@pytest.mark.parametrize("second", CONTRIBUTORY)
def test_contributory_then_contributory_is_a_double_fault(first, second):
    assert combine(first, second) == DF


@pytest.mark.parametrize("second", CONTRIBUTORY + [exc(14, 4)])
def test_page_fault_then_page_fault_or_contributory_is_a_double_fault(second):
    assert combine(PF, second) == DF


@pytest.mark.parametrize("first", BENIGN)
@pytest.mark.parametrize("second", CONTRIBUTORY + [PF] + BENIGN)
def test_after_a_benign_event_the_new_one_is_delivered(first, second):
    assert combine(first, second) == second


@pytest.mark.parametrize("first", CONTRIBUTORY + [PF])
@pytest.mark.parametrize("second", BENIGN)
def test_a_benign_exception_is_delivered_serially(first, second):
    assert combine(first, second) == second


def test_contributory_then_page_fault_delivers_the_page_fault():
    assert combine(exc(13, 0), PF) == PF


@pytest.mark.parametrize("second", CONTRIBUTORY + [PF] + BENIGN + [DF])
def test_anything_during_a_double_fault_is_a_triple_fault(second):
    assert combine(DF, second) is TRIPLE_FAULT


def test_nothing_in_flight_delivers_the_new_event():
    assert combine(None, PF) == PF


@pytest.mark.parametrize("vector", sorted({8, 10, 11, 12, 13, 14, 17, 21, 29, 30}))
def test_error_code_vectors_default_to_zero(vector):
    assert exception_event(vector) == ExceptionEvent(vector, 0)
    assert exception_event(vector, 0x1234).error_code == 0x1234


def test_vectors_above_31_are_software_interrupts():
    assert exception_event(0x80) == InterruptEvent(0x80, soft=True)
    assert exception_event(255) == InterruptEvent(255, soft=True)


def test_cr2_is_the_page_faults_payload():
    assert exception_event(14, 5, cr2=0xFFFF_8000_0000_1000) == ExceptionEvent(14, 5, payload=0xFFFF_8000_0000_1000)


@pytest.mark.parametrize("args", [(256,), (-1,), (3.0,), ("13",), (2,), (1, 0), (6, 7), (32, 0), (13, -1),
                                  (13, 1 << 32), (6, None, 0x1000), (14, 0, 1 << 64)])
def test_invalid_arguments_are_injection_errors(args):
    with pytest.raises(InjectionError):
        exception_event(*args)
