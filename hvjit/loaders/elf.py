"""ELF32/ELF64 x86 executables: program headers to guest-physical memory, symbols kept.

The ELF and program headers are parsed and checked here, field by field (a hostile image
must end in ``LoaderError``, never in an IndexError or a struct error); the symbol table is
decoded with numpy after its section headers were checked the same way (pyelftools is the
reference the unit tests compare it with). An
:class:`ElfImage` keeps the symbols, like VirtualBox's loader images do, so a user can turn
``symbol -> address`` (:meth:`ElfImage.lookup`) and ``address -> "symbol+0xoff"``
(:meth:`ElfImage.symbolize`); the table is read on first use::

    img = ElfImage.parse(open("kernel", "rb").read())
    img.lookup("main")            # 0x100010
    img.symbolize(0x100013)       # 'main+0x3'
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from ..errors import HvjitError, LoaderError
from . import BootInfo, Placer, read_image

ELFCLASS32, ELFCLASS64 = 1, 2
ET_EXEC, ET_DYN = 2, 3
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
SHT_SYMTAB, SHT_STRTAB, SHT_NOTE, SHT_NOBITS, SHT_DYNSYM = 2, 3, 7, 8, 11
SHN_UNDEF, SHN_LORESERVE, SHN_ABS = 0, 0xFF00, 0xFFF1
PN_XNUM = 0xFFFF
MAX_PHNUM = 1024
MAX_SHNUM = 0xFF00
MAX_NOTES = 4096
XEN_ELFNOTE_PHYS32_ENTRY = 18

_EHDR = {ELFCLASS32: struct.Struct("<HHIIIIIHHHHHH"), ELFCLASS64: struct.Struct("<HHIQQQIHHHHHH")}
_PHDR = {ELFCLASS32: struct.Struct("<IIIIIIII"), ELFCLASS64: struct.Struct("<IIQQQQQQ")}
_SHDR = {ELFCLASS32: struct.Struct("<IIIIIIIIII"), ELFCLASS64: struct.Struct("<IIQQQQIIQQ")}
_SYMENT = {ELFCLASS32: 16, ELFCLASS64: 24}
_SYM_DTYPE = {
    ELFCLASS32: np.dtype([("name", "<u4"), ("value", "<u4"), ("size", "<u4"), ("info", "u1"),
                          ("other", "u1"), ("shndx", "<u2")]),
    ELFCLASS64: np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                          ("value", "<u8"), ("size", "<u8")]),
}
_TYPES = {0: "notype", 1: "object", 2: "func", 3: "section", 4: "file", 5: "common", 6: "tls"}
_BINDS = {0: "local", 1: "global", 2: "weak"}


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD program header."""

    index: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int  # PF_X 1, PF_W 2, PF_R 4

    @property
    def perms(self) -> str:
        return "".join(c if self.flags & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))


class Symbol(NamedTuple):
    name: str
    value: int  # the (virtual) address
    size: int
    type: str  # notype, object, func, ...
    bind: str  # local, global, weak
    shndx: int

    def __str__(self) -> str:
        return f"{self.value:#x} {self.size:#6x} {self.type:6} {self.bind:6} {self.name}"


@dataclass(frozen=True)
class Note:
    name: str
    type: int
    desc: bytes


class ElfImage:
    """A parsed, checked ELF executable with its symbol table."""

    def __init__(self, data: bytes, name: str = "ELF image"):
        self.name = name
        self.data = data
        self._parse_header()
        self._parse_program_headers()
        self._sections = self._parse_section_headers()
        self.notes: list[Note] = self._parse_notes()
        self._symtabs = self._check_symbol_tables()
        self._symbols: Optional[tuple[Symbol, ...]] = None  # read on first use (big kernels)

    @property
    def symbols(self) -> tuple[Symbol, ...]:
        """Every named symbol of .symtab (else .dynsym); read on first use."""
        if self._symbols is None:
            self._index(self._read_symbols())
        return self._symbols

    def _index(self, symbols: tuple[Symbol, ...]) -> None:
        rank = {"global": 0, "weak": 1}
        by_name: dict[str, Symbol] = {}
        for s in symbols:  # prefer global over weak over local for lookups
            old = by_name.get(s.name)
            if old is None or rank.get(s.bind, 2) < rank.get(old.bind, 2):
                by_name[s.name] = s
        cands = [s for s in symbols if s.type in ("notype", "object", "func")
                 and s.shndx not in (SHN_UNDEF, SHN_ABS)]
        ordered: list[Symbol] = []
        if cands:
            values = np.array([s.value for s in cands], np.uint64)
            ranks = np.array([rank.get(s.bind, 2) * 2 + (s.type != "func") for s in cands])
            order = np.lexsort((ranks, values))  # by address, the best-ranked first
            sv = values[order]
            first = np.ones(len(sv), bool)
            first[1:] = sv[1:] != sv[:-1]  # one symbol per address
            ordered = [cands[i] for i in order[first].tolist()]
        self._by_name, self._sorted = by_name, ordered
        self._addrs = [s.value for s in ordered]
        self._symbols = symbols

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes, name: str = "ELF image") -> ElfImage:
        return cls(bytes(data), name)

    @classmethod
    def from_file(cls, path) -> ElfImage:
        return cls(read_image(path, "ELF image"), str(path))

    def _err(self, msg: str) -> LoaderError:
        return LoaderError(f"{self.name}: {msg}")

    def _unpack(self, st: struct.Struct, off: int, what: str) -> tuple:
        if off < 0 or off + st.size > len(self.data):
            raise self._err(f"{what} at file offset {off:#x} ({st.size} bytes) extends beyond the "
                            f"end of the file ({len(self.data):#x} bytes)")
        return st.unpack_from(self.data, off)

    def _parse_header(self) -> None:
        d = self.data
        if len(d) < 16 or d[:4] != b"\x7fELF":
            raise self._err("not an ELF image (no \\x7fELF magic)")
        self.elfclass = d[4]
        if self.elfclass not in (ELFCLASS32, ELFCLASS64):
            raise self._err(f"unsupported ELF class {d[4]} (expected 1 for ELF32 or 2 for ELF64)")
        if d[5] != 1:
            raise self._err(f"unsupported ELF data encoding {d[5]} (only little-endian, 1, is x86)")
        if d[6] != 1:
            raise self._err(f"unsupported ELF version {d[6]}")
        (self.type, self.machine, _version, self.entry, self.phoff, self.shoff, _flags, _ehsize,
         self.phentsize, self.phnum, self.shentsize, self.shnum, self.shstrndx) = \
            self._unpack(_EHDR[self.elfclass], 16, "truncated ELF header")
        if self.machine not in (EM_386, EM_X86_64):
            raise self._err(f"ELF machine {self.machine} is not x86 (EM_386 3 or EM_X86_64 62)")
        if self.type != ET_EXEC:
            kind = {ET_DYN: "ET_DYN (shared object or PIE: link with -no-pie)", 1: "ET_REL (an object "
                    "file: link it first)"}.get(self.type, str(self.type))
            raise self._err(f"ELF type {kind} is not an executable (ET_EXEC)")

    @property
    def bits(self) -> int:
        return 32 if self.elfclass == ELFCLASS32 else 64

    def _parse_program_headers(self) -> None:
        st = _PHDR[self.elfclass]
        if self.phnum == 0 or self.phoff == 0:
            raise self._err("no program headers (e_phnum 0): nothing to load")
        if self.phnum == PN_XNUM or self.phnum > MAX_PHNUM:
            raise self._err(f"absurd program header count e_phnum={self.phnum} (at most {MAX_PHNUM})")
        if self.phentsize != st.size:
            raise self._err(f"program header entry size e_phentsize={self.phentsize}, expected "
                            f"{st.size} for ELF{self.bits}")
        end = self.phoff + self.phnum * st.size
        if end > len(self.data):
            raise self._err(f"program headers [{self.phoff:#x}-{end:#x}) extend beyond the end of "
                            f"the file ({len(self.data):#x} bytes)")
        self.segments: list[Segment] = []
        self._note_ranges: list[tuple[int, int]] = []
        for i in range(self.phnum):
            f = st.unpack_from(self.data, self.phoff + i * st.size)
            if self.elfclass == ELFCLASS32:
                p_type, off, vaddr, paddr, filesz, memsz, flags, _align = f
            else:
                p_type, flags, off, vaddr, paddr, filesz, memsz, _align = f
            if p_type not in (PT_LOAD, PT_NOTE):
                continue
            if off + filesz > len(self.data):
                raise self._err(f"program header {i}: file range [{off:#x}-{off + filesz:#x}) "
                                f"extends beyond the end of the file ({len(self.data):#x} bytes)")
            if p_type == PT_NOTE:
                self._note_ranges.append((off, filesz))
                continue
            if memsz == 0:
                continue
            if filesz > memsz:
                raise self._err(f"program header {i}: p_filesz {filesz:#x} exceeds p_memsz {memsz:#x}")
            if paddr + memsz > 1 << 52:
                raise self._err(f"program header {i}: [{paddr:#x}+{memsz:#x}) lies outside physical "
                                "address space")
            self.segments.append(Segment(i, off, vaddr, paddr, filesz, memsz, flags))
        if not self.segments:
            raise self._err("no loadable (PT_LOAD) segments")

    def _parse_section_headers(self) -> list[tuple]:
        """Checked section headers: (name, type, offset, size, link, entsize); [] if none."""
        if self.shoff == 0 or self.shnum == 0:
            return []
        st = _SHDR[self.elfclass]
        if self.shentsize != st.size:
            raise self._err(f"section header entry size e_shentsize={self.shentsize}, expected "
                            f"{st.size} for ELF{self.bits}")
        if self.shnum >= MAX_SHNUM:
            raise self._err(f"absurd section header count e_shnum={self.shnum}")
        end = self.shoff + self.shnum * st.size
        if end > len(self.data):
            raise self._err(f"section headers [{self.shoff:#x}-{end:#x}) extend beyond the end of "
                            f"the file ({len(self.data):#x} bytes)")
        out = []
        for i in range(self.shnum):
            (name, typ, _flags, _addr, off, size, link, _info, _align,
             entsize) = st.unpack_from(self.data, self.shoff + i * st.size)
            if typ != SHT_NOBITS and typ != 0 and off + size > len(self.data):
                raise self._err(f"section {i}: file range [{off:#x}-{off + size:#x}) extends beyond "
                                f"the end of the file ({len(self.data):#x} bytes)")
            out.append((name, typ, off, size, link, entsize))
        return out

    def _parse_notes(self) -> list[Note]:
        ranges = list(self._note_ranges)
        if not ranges:  # no PT_NOTE: SHT_NOTE sections
            ranges = [(off, size) for _n, typ, off, size, _l, _e in self._sections if typ == SHT_NOTE]
        notes: list[Note] = []
        for start, size in ranges:
            pos, end = start, start + size
            while pos + 12 <= end:
                namesz, descsz, typ = struct.unpack_from("<III", self.data, pos)
                name_at = pos + 12
                desc_at = name_at + (namesz + 3) // 4 * 4
                nxt = desc_at + (descsz + 3) // 4 * 4
                if desc_at + descsz > end:
                    raise self._err(f"ELF note at file offset {pos:#x}: name/desc sizes "
                                    f"({namesz}, {descsz}) run past its note segment end {end:#x}")
                name = self.data[name_at:name_at + namesz].rstrip(b"\0").decode("latin-1")
                notes.append(Note(name, typ, self.data[desc_at:desc_at + descsz]))
                if len(notes) > MAX_NOTES:
                    raise self._err(f"absurd number of ELF notes (more than {MAX_NOTES})")
                pos = nxt
        return notes

    def _check_symbol_tables(self) -> list[tuple]:
        secs = self._sections
        tabs = [s for s in secs if s[1] == SHT_SYMTAB] or [s for s in secs if s[1] == SHT_DYNSYM]
        for _n, _typ, _off, _size, link, entsize in tabs:
            if entsize != _SYMENT[self.elfclass]:
                raise self._err(f"symbol table entry size {entsize}, expected {_SYMENT[self.elfclass]}")
            if not 0 < link < len(secs) or secs[link][1] != SHT_STRTAB:
                raise self._err(f"symbol table links to section {link}, which is not a string table")
        return tabs

    def _read_symbols(self) -> tuple[Symbol, ...]:
        """Decode the symbol table with numpy (30x faster than pyelftools on a 100k-symbol
        kernel; the unit tests compare both). Every offset was checked by the section parse."""
        out: list[Symbol] = []
        dtype = _SYM_DTYPE[self.elfclass]
        for _n, _typ, off, size, link, _entsize in self._symtabs:
            count = size // dtype.itemsize
            syms = np.frombuffer(self.data, dtype, count, off)
            _sn, _st, str_off, str_size, _sl, _se = self._sections[link]
            strtab = self.data[str_off:str_off + str_size]
            names, values, sizes = syms["name"].tolist(), syms["value"].tolist(), syms["size"].tolist()
            infos, shndxs = syms["info"].tolist(), syms["shndx"].tolist()
            for i in range(count):
                at = names[i]
                if at == 0:
                    continue
                if at >= len(strtab):
                    raise self._err(f"symbol {i}: name offset {at:#x} is outside its string table "
                                    f"({len(strtab):#x} bytes)")
                end = strtab.find(b"\0", at)
                if end < 0:
                    raise self._err(f"symbol {i}: name at {at:#x} is not NUL-terminated in its string table")
                info = infos[i]
                out.append(Symbol(strtab[at:end].decode("utf-8", "replace"), values[i], sizes[i],
                                  _TYPES.get(info & 0xF, str(info & 0xF)),
                                  _BINDS.get(info >> 4, str(info >> 4)), shndxs[i]))
        return tuple(out)

    # ---- queries -----------------------------------------------------------------------------

    def to_physical(self, vaddr: int) -> Optional[int]:
        """The physical address a virtual address of a loaded segment is loaded at."""
        for s in self.segments:
            if s.vaddr <= vaddr < s.vaddr + s.memsz:
                return s.paddr + (vaddr - s.vaddr)
        return None

    @property
    def entry_physical(self) -> int:
        """``e_entry`` as a physical address (through the segment holding it)."""
        p = self.to_physical(self.entry)
        return self.entry if p is None else p

    @property
    def physical_range(self) -> tuple[int, int]:
        return (min(s.paddr for s in self.segments), max(s.paddr + s.memsz for s in self.segments))

    def note(self, name: str, type_: int) -> Optional[Note]:
        return next((n for n in self.notes if n.name == name and n.type == type_), None)

    @property
    def pvh_entry(self) -> Optional[int]:
        """The Xen PVH 32-bit physical entry point (XEN_ELFNOTE_PHYS32_ENTRY), if any."""
        n = self.note("Xen", XEN_ELFNOTE_PHYS32_ENTRY)
        if n is None:
            return None
        if len(n.desc) not in (4, 8):
            raise self._err(f"Xen PHYS32_ENTRY note has a {len(n.desc)}-byte value (expected 4 or 8)")
        value = int.from_bytes(n.desc, "little")
        if value >= 1 << 32:
            raise self._err(f"Xen PHYS32_ENTRY {value:#x} is above 4 GiB")
        return value

    def lookup(self, name: str) -> int:
        """A symbol's address; ``KeyError`` if the image has no such symbol."""
        s = self.symbols and self._by_name.get(name)
        if not s:
            raise KeyError(f"{self.name}: no symbol {name!r}" + ("" if self.symbols else
                                                                 " (the image has no symbol table)"))
        return s.value

    def symbol(self, name: str) -> Symbol:
        self.lookup(name)
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return bool(self.symbols) and name in self._by_name

    def symbol_at(self, addr: int) -> Optional[tuple[Symbol, int]]:
        """(symbol, offset) of the nearest symbol at or below ``addr`` that plausibly owns it."""
        _ = self.symbols  # make sure they are read
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        s = self._sorted[i]
        if s.size and addr < s.value + s.size:
            return s, addr - s.value
        # Past a sized symbol's end (or a size-0 label): still its neighbourhood only when both
        # lie in one loaded segment.
        for seg in self.segments:
            if seg.vaddr <= s.value < seg.vaddr + seg.memsz:
                if addr < seg.vaddr + seg.memsz:
                    return s, addr - s.value
                return None
        return None

    def symbolize(self, addr: int) -> str:
        """``"name+0xoff"`` (``"name"`` at offset 0), or the bare hex address."""
        hit = self.symbol_at(addr)
        if hit is None:
            return f"{addr:#x}"
        s, off = hit
        return s.name if off == 0 else f"{s.name}+{off:#x}"

    # ---- loading -------------------------------------------------------------------------------

    def load_into(self, memory, placer: Optional[Placer] = None) -> list[tuple[str, int, int]]:
        """Write every PT_LOAD segment at its p_paddr, zero-filling p_memsz beyond p_filesz."""
        loaded = []
        for s in self.segments:
            what = f"ELF segment {s.index} ({s.perms})"
            if placer is not None:
                placer.claim(s.paddr, s.memsz, what)
            elif not memory.is_mapped(s.paddr, s.memsz):
                raise self._err(f"{what} [{s.paddr:#x}-{s.paddr + s.memsz:#x}) is not inside guest RAM")
            loaded.append((what, s.paddr, s.memsz))
        for s in self.segments:  # all checked: now write
            if s.filesz:
                memory.write(s.paddr, self.data[s.offset:s.offset + s.filesz])
            if s.memsz > s.filesz:
                memory.fill(s.paddr + s.filesz, s.memsz - s.filesz, 0)
        return loaded

    def __repr__(self) -> str:
        return (f"<ElfImage {self.name!r} ELF{self.bits} entry={self.entry:#x} "
                f"segments={len(self.segments)}>")


def pvh_entry(data: bytes) -> Optional[int]:
    """The PVH entry of an ELF image, None if it has none (``LoaderError`` if malformed)."""
    return ElfImage(data).pvh_entry


def load(vm, vcpu, data: bytes, *, entry: Optional[int] = None, mode: Optional[str] = None,
         cpl: int = 0) -> BootInfo:
    """Load a plain ELF executable and enter it: ELF32 in protected mode, ELF64 in long mode
    (identity-mapped low 4 GiB), at ``e_entry`` translated to its physical address."""
    from .. import entry as _entry

    img = ElfImage(data)
    try:
        mode = _entry.Mode(mode or ("protected" if img.bits == 32 else "long"))
    except ValueError:
        raise LoaderError(f"unknown entry mode {mode!r}; known: real, protected, long") from None
    limit = {_entry.Mode.REAL: 0x100000, _entry.Mode.PROTECTED: 1 << 32}.get(mode)
    placer = Placer(vm, limit=limit)
    loaded = img.load_into(vm.memory, placer)
    rip = img.entry_physical if entry is None else entry
    stack = None if mode == _entry.Mode.REAL else placer.boot_stack()
    try:
        state = _entry.setup_mode(vcpu, mode, rip, cpl=cpl, stack=stack)
    except HvjitError as e:
        raise LoaderError(f"cannot enter the ELF image: {e}") from None
    return BootInfo(format="elf", entry=rip, mode=mode.value, stack=state.stack, loaded=loaded,
                    memory_map=placer.memory_map, image=img)
