"""The MSR prober: in-guest RDMSR/WRMSR under a #GP handler, KVM_GET_MSRS, host MSRs, the CLI."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from hvjit import Session
from hvjit import _trampoline as _t
from hvjit.entry import EFER_LMA, EFER_LME
from hvjit.errors import AccessDeniedError, SessionClosedError
from hvjit.msr import (
    READ_OFF,
    STAGE_READ,
    STAGE_WRITE,
    GuestMsrProber,
    HostMsrProber,
    HostMsrUnavailableError,
    default_indices,
    host_msr_availability,
)
from hvjit.system import Kvm

EFER, TSC, SYSENTER_CS, SYSENTER_ESP, MTRRCAP, PRED_CMD = 0xC0000080, 0x10, 0x174, 0x175, 0xFE, 0x49
NONEXISTENT = 0xDEADBEEF
EFER_SCE = 1


@pytest.fixture(scope="module")
def prober():
    with Session() as s, GuestMsrProber(s) as p:
        yield p


# ---- in the guest and through KVM ------------------------------------------------------------

def test_efer_reads_what_long_mode_entry_set(prober):
    r = prober.read(EFER)
    assert r.ok and r.vector is None
    assert r.value & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert r.value == int(prober._sregs["efer"])
    assert prober.kvm_values([EFER])[EFER] == r.value


def test_tsc_grows_between_guest_reads(prober):
    a = prober.read(TSC)
    b = prober.read(TSC)
    assert a.ok and b.ok and b.value > a.value > 0


def test_nonexistent_msr_faults_in_guest_and_is_refused_by_kvm(prober):
    r = prober.read(NONEXISTENT)
    assert not r.ok and r.vector == 13 and r.fault_name == "#GP" and r.stage == STAGE_READ
    assert prober.kvm_values([EFER, NONEXISTENT, TSC]) == {
        EFER: prober.read(EFER).value, NONEXISTENT: None, TSC: pytest.approx(prober.read(TSC).value, rel=1e-3)}


def test_write_only_pred_cmd_is_not_readable(prober):
    r = prober.read(PRED_CMD)
    assert not r.ok and r.fault_name == "#GP"


def test_sysenter_msrs_are_writable(prober):
    mask, notes = prober.writable_mask(SYSENTER_CS)
    assert mask & 0xFFFF == 0xFFFF, (hex(mask), notes)
    mask, _ = prober.writable_mask(SYSENTER_ESP)
    assert mask & 0xFFFFFFFF == 0xFFFFFFFF
    # Every write test put the original value back.
    assert prober.read(SYSENTER_CS).value == 0


def test_efer_writable_bits_and_guest_survives(prober):
    mask, _ = prober.writable_mask(EFER)
    assert mask & EFER_SCE  # SYSCALL enable toggles freely
    assert not mask & (EFER_LME | EFER_LMA)  # clearing LME under paging #GPs; LMA is read-only
    assert prober.read(EFER).value == int(prober._sregs["efer"])


def test_read_only_msr_has_no_writable_bits(prober):
    mask, notes = prober.writable_mask(MTRRCAP)
    assert mask == 0 and "read-only" in notes[0]


def test_failed_write_reports_stage(prober):
    r = prober.write_test(EFER, EFER_LME)  # clearing LME with paging on
    assert not r.ok and r.stage == STAGE_WRITE and r.fault_name == "#GP"
    assert r.original == int(prober._sregs["efer"]) and r.written == r.original ^ EFER_LME
    assert prober.read(EFER).ok


def test_breaking_writes_do_not_spoil_later_probes(prober):
    # x2APIC on (restoring it in the guest is an illegal transition), then every MSR that
    # makes KVM write guest memory: the snapshot restore keeps the next probes working.
    kvm = prober.kvm_values([0x1B, 0x4B564D00, 0x4B564D01, 0x11, 0x12])
    for index, value in kvm.items():
        if value is not None:
            prober.writable_mask(index)
    assert prober.read(EFER).value == int(prober._sregs["efer"])
    assert prober.read(0x1B).value == int(prober._sregs["apic_base"])
    assert prober.writable_mask(SYSENTER_CS)[0] & 0xFFFF == 0xFFFF


def test_hung_guest_is_kicked_and_the_next_probe_works():
    with Session() as s, GuestMsrProber(s, timeout=0.3) as p:
        p.vm.memory.write(p._saved_pages[0][0] + READ_OFF, b"\xeb\xfe")  # jmp .
        t0 = time.monotonic()
        r = p.read(EFER)
        assert not r.ok and r.broken and time.monotonic() - t0 < 5
        assert p.read(EFER).ok  # code pages restored from the snapshot


def test_probe_rows(prober):
    sources = {EFER: ["well_known"], NONEXISTENT: ["test"], SYSENTER_CS: ["well_known"]}
    rows = {r.index: r for r in prober.probe(sources, sources=sources)}
    assert list(rows) == sorted(sources)
    efer = rows[EFER]
    assert efer.name == "EFER" and efer.kvm_value == efer.guest_value and efer.writable_mask & EFER_SCE
    bad = rows[NONEXISTENT]
    assert bad.kvm_value is None and bad.guest_value is None and bad.guest_fault == "#GP"
    assert bad.writable_mask is None and bad.sources == ["test"]


def test_default_indices_cover_kvm_lists():
    kvm = Kvm.instance()
    d = default_indices(kvm)
    assert set(kvm.msr_index_list()) <= set(d) and set(kvm.feature_msr_index_list()) <= set(d)
    assert "well_known" in d[EFER]


# ---- host MSRs -------------------------------------------------------------------------------

def test_restricted_session_may_not_probe_host_msrs():
    with Session(restricted=True) as s:
        with pytest.raises(AccessDeniedError):
            HostMsrProber(s)
    with pytest.raises(SessionClosedError):
        HostMsrProber(s)


def test_host_probe_reports_availability(session):
    avail = host_msr_availability(0)
    prober = HostMsrProber(session)
    if not os.path.exists("/dev/cpu/0/msr"):
        assert not avail and "absent" in avail.reason and "/dev/cpu/0/msr" in avail.reason
        with pytest.raises(HostMsrUnavailableError, match="absent"):
            prober.read(TSC)
    elif not avail:
        with pytest.raises(AccessDeniedError):
            prober.read(TSC)
    else:
        r = prober.read(TSC)
        assert not r.faulted and r.value > 0
        assert prober.read(NONEXISTENT).faulted


class FakeMsrLib:
    """hvt_msr_host_read/write over a dict; unknown MSRs fault (-EIO); LOCKED can't be written."""

    LOCKED = 0x3A

    def __init__(self):
        self.msrs = {0x174: 0x10, 0x3A: 0x5}
        self.writes = []

    def hvt_msr_host_read(self, cpu, index, out):
        if index not in self.msrs:
            return -errno.EIO
        out[0] = self.msrs[index]
        return 0

    def hvt_msr_host_write(self, cpu, index, value):
        self.writes.append((index, value))
        if index not in self.msrs or index == self.LOCKED:
            return -errno.EIO
        self.msrs[index] = value & 0xFFFF  # 16 writable bits
        return 0


def test_host_read_write_modify_report_faults(session, monkeypatch):
    fake = FakeMsrLib()
    monkeypatch.setattr(_t, "lib", fake)
    p = HostMsrProber(session, cpu=1)
    assert p.read(0x174).value == 0x10 and not p.read(0x174).faulted
    r = p.read(NONEXISTENT)
    assert r.faulted and r.value is None and r.cpu == 1
    assert p.write(NONEXISTENT, 1).faulted and not p.write(0x174, 0x11).faulted
    m = p.modify(0x174, ~0xF, 0x12345)
    assert (m.before, m.written, m.after) == (0x11, 0x12355, 0x2355)
    assert not (m.before_faulted or m.modify_faulted or m.after_faulted or m.restore_faulted)
    assert m.restored and fake.msrs[0x174] == 0x11
    m = p.modify(0x174, 0, 0xFF, restore=False)
    assert m.after == 0xFF and not m.restored and fake.msrs[0x174] == 0xFF
    m = p.modify(0x3A, ~0, 1)
    assert m.before == 0x5 and m.modify_faulted and m.after == 0x5 and m.restore_faulted and not m.restored
    m = p.modify(NONEXISTENT, 0, 0)
    assert m.before_faulted and m.written is None


def test_host_permission_errors_are_access_denied(session, monkeypatch):
    class Denied(FakeMsrLib):
        def hvt_msr_host_read(self, cpu, index, out):
            return -errno.EACCES

    monkeypatch.setattr(_t, "lib", Denied())
    with pytest.raises(AccessDeniedError, match="CAP_SYS_RAWIO"):
        HostMsrProber(session).read(TSC)


# ---- the command -----------------------------------------------------------------------------

def hvjit(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hvjit", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_default_probe_json_schema():
    t0 = time.monotonic()
    p = hvjit("msr-probe", "--json", "--host")
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    host = doc["host"]
    assert {"flavour", "cpu", "msr_device", "host_probe"} <= set(host)
    assert host["msr_device"] == os.path.exists("/dev/cpu/0/msr")
    if not host["msr_device"]:
        assert host["host_probe"].startswith("absent: ")
    msrs = doc["msrs"]
    indices = [m["index"] for m in msrs]
    assert indices == sorted(set(indices)) and len(msrs) >= len(Kvm.instance().msr_index_list())
    for m in msrs:
        assert {"index", "name", "kvm_value", "guest_value", "guest_fault", "writable_mask"} <= set(m)
        assert (m["guest_value"] is None) == (m["guest_fault"] is not None)
    efer = next(m for m in msrs if m["index"] == EFER)
    assert efer["name"] == "EFER" and efer["guest_value"] & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert efer["writable_mask"] & EFER_SCE
    assert elapsed < 60 and doc["guest"]["seconds"] < 30


def test_cli_range_and_text():
    p = hvjit("msr-probe", "--range", "0x10-0x12", "--json")
    assert p.returncode == 0, p.stderr
    msrs = json.loads(p.stdout)["msrs"]
    assert [m["index"] for m in msrs] == [0x10, 0x11, 0x12]
    assert msrs[0]["name"] == "TSC" and msrs[0]["guest_value"] > 0
    assert all(m["writable_mask"] is not None for m in msrs if m["guest_value"] is not None)
    p = hvjit("msr-probe", "--range", "c0000080-c0000081", "--host")
    assert p.returncode == 0, p.stderr
    assert "EFER" in p.stdout and "STAR" in p.stdout
    if not os.path.exists("/dev/cpu/0/msr"):
        assert "host MSRs: absent:" in p.stdout
    bad = hvjit("msr-probe", "--range", "nonsense")
    assert bad.returncode == 1 and "expected A-B" in bad.stderr
