"""ACPI and MP tables, parsed back the way a guest (or acpidump) finds them."""

import struct

import pytest

from hvjit.firmware import acpi, mptable, write_acpi_tables, write_mp_table


class FakeMemory:
    """The first MiB of guest RAM."""

    def __init__(self, size=1 << 20):
        self.ram = bytearray(size)

    def is_mapped(self, gpa, length=1):
        return 0 <= gpa and gpa + length <= len(self.ram)

    def write(self, gpa, data):
        assert self.is_mapped(gpa, len(data))
        self.ram[gpa: gpa + len(data)] = data

    def read(self, gpa, length):
        return bytes(self.ram[gpa: gpa + length])


# ---- a small independent parser -------------------------------------------------------------

def find_rsdp(mem, start=0xE0000, end=0x100000):
    for addr in range(start, end, 16):
        if mem.read(addr, 8) == b"RSD PTR ":
            return addr
    return None


def parse_table(mem, gpa):
    sig, length = struct.unpack("<4sI", mem.read(gpa, 8))
    data = mem.read(gpa, length)
    assert len(data) == length >= 36, f"{sig} truncated"
    assert sum(data) % 256 == 0, f"{sig} checksum"
    return sig, data


def parse_all(mem):
    rsdp_gpa = find_rsdp(mem)
    assert rsdp_gpa is not None
    rsdp = mem.read(rsdp_gpa, 36)
    assert sum(rsdp[:20]) % 256 == 0
    rev, rsdt_gpa, length, xsdt_gpa = struct.unpack_from("<BIIQ", rsdp, 15)
    assert rev == 2 and length == 36 and sum(rsdp) % 256 == 0
    sig, rsdt = parse_table(mem, rsdt_gpa)
    assert sig == b"RSDT"
    rsdt_entries = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    sig, xsdt = parse_table(mem, xsdt_gpa)
    assert sig == b"XSDT"
    xsdt_entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert list(rsdt_entries) == list(xsdt_entries)
    tables = dict(parse_table(mem, gpa) for gpa in rsdt_entries)
    return rsdp_gpa, tables


def madt_entries(madt):
    out, at = [], 44
    while at < len(madt):
        kind, length = madt[at], madt[at + 1]
        assert length >= 2 and at + length <= len(madt)
        out.append((kind, madt[at: at + length]))
        at += length
    assert at == len(madt)
    return out


# ---- tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cpus", [1, 4, 64])
def test_rsdp_found_by_scan_and_every_checksum_valid(cpus):
    mem = FakeMemory()
    rsdp = write_acpi_tables(mem, cpus=cpus, pm_base=0x600)
    found, tables = parse_all(mem)
    assert found == rsdp
    assert find_rsdp(mem, 0xF0000) == rsdp  # older kvm-unit-tests scan only 0xF0000-0xFFFFF
    assert set(tables) == {b"FACP", b"APIC"}


@pytest.mark.parametrize("cpus", [1, 3, 16])
def test_madt_has_the_cpus_and_the_ioapic(cpus):
    mem = FakeMemory()
    write_acpi_tables(mem, cpus=cpus)
    _, tables = parse_all(mem)
    madt = tables[b"APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == 0xFEE00000 and flags & 1
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic_id, fl) for _, _, uid, apic_id, fl in lapics] == [(i, i, 1) for i in range(cpus)]
    ioapics = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert len(ioapics) == 1 and ioapics[0][4:] == (0xFEC00000, 0)
    overrides = {e[3]: struct.unpack_from("<IH", e, 4) for k, e in entries if k == 2}
    assert overrides[0] == (2, 0)  # IRQ0 -> GSI2
    assert overrides[9] == (9, 0x000D)  # SCI: level, active high


def test_fadt_points_at_the_pm_timer_facs_and_dsdt():
    mem = FakeMemory()
    write_acpi_tables(mem, cpus=2, pm_base=0xB000)
    _, tables = parse_all(mem)
    fadt = tables[b"FACP"]
    assert len(fadt) == 244 and fadt[8] == 3
    facs_gpa, dsdt_gpa = struct.unpack_from("<II", fadt, 36)
    sci, smi_cmd = struct.unpack_from("<HI", fadt, 46)
    assert sci == 9 and smi_cmd == 0
    evt, _, cnt, _, _, tmr = struct.unpack_from("<6I", fadt, 56)
    assert (evt, cnt, tmr) == (0xB000, 0xB004, 0xB008)
    assert tuple(fadt[88:92]) == (4, 2, 0, 4)
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert not flags & (1 << 8)  # TMR_VAL_EXT clear: 24-bit timer
    space, width, _, _, addr = struct.unpack_from("<BBBBQ", fadt, 208)  # X_PM_TMR_BLK
    assert (space, width, addr) == (1, 32, 0xB008)
    assert struct.unpack_from("<BBBBQ", fadt, 148)[4] == 0xB000
    assert struct.unpack_from("<BBBBQ", fadt, 172)[4] == 0xB004
    assert struct.unpack_from("<BBBBQ", fadt, 116)[4] == 0xCF9 and fadt[128] == 0x06
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt_gpa
    # FACS: 64-byte aligned, no checksum; DSDT: valid, with \_S5.
    assert facs_gpa % 64 == 0 and mem.read(facs_gpa, 4) == b"FACS"
    assert struct.unpack("<I", mem.read(facs_gpa + 4, 4))[0] == 64
    sig, dsdt = parse_table(mem, dsdt_gpa)
    assert sig == b"DSDT" and b"_S5_" in dsdt[36:]


def test_pm_block_layout_matches_the_device():
    from hvjit.devices import pm_timer

    assert (acpi.PM1_EVT_OFFSET, acpi.PM1_CNT_OFFSET, acpi.PM_TMR_OFFSET) == (
        pm_timer.PM1_EVT_OFFSET, pm_timer.PM1_CNT_OFFSET, pm_timer.PM_TMR_OFFSET)
    assert (acpi.PM1_EVT_LEN, acpi.PM1_CNT_LEN, acpi.PM_TMR_LEN) == (
        pm_timer.PM1_EVT_LEN, pm_timer.PM1_CNT_LEN, pm_timer.PM_TMR_LEN)
    assert acpi.DEFAULT_PM_BASE == pm_timer.DEFAULT_BASE


def test_tables_stay_in_the_bios_area_and_refuse_bad_arguments():
    tables = acpi.acpi_tables(cpus=255)
    assert all(0xE0000 <= g and g + len(d) <= 0x100000 for g, d in tables.items())
    with pytest.raises(acpi.AcpiError):
        acpi.acpi_tables(cpus=0)
    with pytest.raises(acpi.AcpiError):
        acpi.acpi_tables(cpus=1, rsdp_gpa=0xF0008)
    with pytest.raises(acpi.AcpiError):
        acpi.acpi_tables(cpus=1, table_base=0xFFF00)  # would run past 1 MiB
    with pytest.raises(acpi.AcpiError):
        write_acpi_tables(FakeMemory(0x80000), cpus=1)  # no RAM at 0xE0000


def test_mp_table_parses_back():
    mem = FakeMemory()
    write_acpi_tables(mem, cpus=4)
    gpa = write_mp_table(mem, cpus=4)
    found = [a for a in range(0xF0000, 0x100000, 16) if mem.read(a, 4) == b"_MP_"]
    assert found == [gpa]
    fp = mem.read(gpa, 16)
    assert sum(fp) % 256 == 0 and fp[8] == 1 and fp[9] == 4
    config_gpa = struct.unpack_from("<I", fp, 4)[0]
    sig, length = struct.unpack("<4sH", mem.read(config_gpa, 6))
    config = mem.read(config_gpa, length)
    assert sig == b"PCMP" and sum(config) % 256 == 0
    count, lapic = struct.unpack_from("<HI", config, 34)
    assert lapic == 0xFEE00000
    at, kinds_seen, cpus, irqs = 44, [], [], {}
    for _ in range(count):
        kind = config[at]
        size = 20 if kind == 0 else 8
        kinds_seen.append(kind)
        if kind == 0:
            cpus.append((config[at + 1], config[at + 3]))
        if kind == 3:
            irqs[config[at + 5]] = config[at + 7]
        at += size
    assert at == length
    assert cpus == [(0, 3), (1, 1), (2, 1), (3, 1)]
    assert kinds_seen.count(1) == 1 and kinds_seen.count(2) == 1 and kinds_seen.count(4) == 2
    assert irqs[0] == 2 and 2 not in irqs and irqs[9] == 9 and len(irqs) == 15
    with pytest.raises(acpi.AcpiError):
        mptable.mp_table(cpus=1, gpa=0xF0004)
