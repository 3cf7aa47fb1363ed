"""Intel-syntax text for decoded instructions, for error reports (not a full disassembler).

``format_instruction(record, data)`` renders the general-purpose instructions a VM-exit
path meets (moves, ALU, stack, branches, string and port IO, system instructions) with
their operands; anything else falls back to ``db 0x..`` bytes plus the operation class.
Numbers are hex with a ``0x`` prefix, memory operands always carry their size
(``dword ptr [rbx+rsi*4+0x10]``) and RIP-relative operands print as ``[rip+disp]``.
"""

from __future__ import annotations

from hvjit.kernels.decode import REG_NONE, REG_RIP, DecodeStatus, OpClass, VexKind

_GPR = {
    8: "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split(),
    4: "eax ecx edx ebx esp ebp esi edi r8d r9d r10d r11d r12d r13d r14d r15d".split(),
    2: "ax cx dx bx sp bp si di r8w r9w r10w r11w r12w r13w r14w r15w".split(),
    1: "al cl dl bl spl bpl sil dil r8b r9b r10b r11b r12b r13b r14b r15b".split(),
}
_LEGACY_BYTE = "al cl dl bl ah ch dh bh".split()
_SEGMENTS = "es cs ss ds fs gs".split()
_PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword", 10: "tbyte", 16: "xmmword"}
_CONDITIONS = "o no b ae e ne be a s ns p np l ge le g".split()
_ALU = "add or adc sbb and sub xor cmp".split()
_SHIFTS = "rol ror rcl rcr shl shr shl sar".split()  # /6 is an alias of shl
_GROUP3 = "test test not neg mul imul div idiv".split()
_GROUP5 = "inc dec call call jmp jmp push".split()
_STRING_OPS = {0xA4: "movs", 0xA6: "cmps", 0xAA: "stos", 0xAC: "lods", 0xAE: "scas",
               0x6C: "ins", 0x6E: "outs"}
_SIZE_SUFFIX = {1: "b", 2: "w", 4: "d", 8: "q"}

# One-byte and 0F opcodes without operands.
_BARE_ONE_BYTE = {0x9B: "fwait", 0x9E: "sahf", 0x9F: "lahf", 0xC9: "leave", 0xCC: "int3",
                  0xCE: "into", 0xD7: "xlatb", 0xF1: "int1", 0xF4: "hlt", 0xF5: "cmc",
                  0xF8: "clc", 0xF9: "stc", 0xFA: "cli", 0xFB: "sti", 0xFC: "cld", 0xFD: "std"}
_BARE_0F = {0x05: "syscall", 0x06: "clts", 0x08: "invd", 0x09: "wbinvd", 0x0B: "ud2",
            0x30: "wrmsr", 0x31: "rdtsc", 0x32: "rdmsr", 0x33: "rdpmc", 0x34: "sysenter",
            0xA2: "cpuid", 0xAA: "rsm", 0x77: "emms"}
_REGISTER_FORMS_0F01 = {0xC1: "vmcall", 0xC2: "vmlaunch", 0xC3: "vmresume", 0xC4: "vmxoff",
                        0xC8: "monitor", 0xC9: "mwait", 0xCA: "clac", 0xCB: "stac",
                        0xD0: "xgetbv", 0xD1: "xsetbv", 0xD9: "vmmcall", 0xE8: "serialize",
                        0xEE: "rdpkru", 0xEF: "wrpkru", 0xF8: "swapgs", 0xF9: "rdtscp"}
_GROUP7_MEMORY = "sgdt sidt lgdt lidt smsw - lmsw invlpg".split()
_GROUP15_MEMORY = "fxsave fxrstor ldmxcsr stmxcsr xsave xrstor xsaveopt clflush".split()
_GROUP9_MEMORY = {3: "xrstors", 4: "xsavec", 5: "xsaves"}
# Instructions whose 64-bit (REX.W) form the SDM names with a "64" suffix.
_REX_W_SUFFIX_64 = {"fxsave", "fxrstor", "xsave", "xrstor", "xsaveopt", "xrstors", "xsavec", "xsaves"}


class _Operands:
    """Renders the operands of one record."""

    def __init__(self, record, data: bytes):
        self.r = record
        self.data = data
        self.osize = int(record["operand_size"])
        self.rex = int(record["rex"])
        self.next_ip = int(record["address"]) + int(record["length"])

    def gpr(self, number: int, size: int) -> str:
        if size == 1 and not self.rex and number < 8:
            return _LEGACY_BYTE[number]
        return _GPR[size][number & 15]

    def reg(self, size: int | None = None) -> str:
        return self.gpr(int(self.r["reg"]), size or self.osize)

    def mem(self, size: int | None) -> str:
        r = self.r
        asize = int(r["address_size"])
        parts = []
        base, index = int(r["base_reg"]), int(r["index_reg"])
        if base == REG_RIP:
            parts.append("rip" if asize == 8 else "eip")
        elif base != REG_NONE:
            parts.append(_GPR[asize][base])
        if index != REG_NONE:
            scale = int(r["scale"])
            parts.append(_GPR[asize][index & 15] + (f"*{scale}" if scale != 1 else ""))
        text = "+".join(parts)
        disp = int(r["disp"])
        if not parts:
            text = hex(disp & ((1 << (8 * asize)) - 1))
        elif disp < 0:
            text += f"-{-disp:#x}"
        elif disp > 0:
            text += f"+{disp:#x}"
        segment = int(r["segment"])
        prefix = f"{_SEGMENTS[segment]}:" if segment >= 0 else ""
        size_text = f"{_PTR[size]} ptr " if size in _PTR else ""
        return f"{size_text}{prefix}[{text}]"

    def rm(self, size: int | None = None) -> str:
        size = size or self.osize
        if int(self.r["mod"]) == 3:
            return self.gpr(int(self.r["rm"]), size)
        return self.mem(size)

    def imm(self, size: int | None = None) -> str:
        size = size or self.osize
        return hex(int(self.r["imm"]) & ((1 << (8 * size)) - 1))

    def target(self) -> str:
        return hex((self.next_ip + int(self.r["imm"])) & ((1 << (8 * self.osize)) - 1))


def _string_op(r, op: _Operands, base: int) -> str:
    size = 1 if r["opcode"] == base else op.osize
    name = _STRING_OPS[base] + _SIZE_SUFFIX[size]
    asize = int(r["address_size"])
    di = f"{_PTR[size]} ptr [{_GPR[asize][7]}]"
    si = f"{_PTR[size]} ptr [{_GPR[asize][6]}]"
    operands = {0xA4: (di, si), 0xA6: (si, di), 0xAA: (di,), 0xAC: (si,), 0xAE: (di,),
                0x6C: (di, "dx"), 0x6E: ("dx", si)}[base]
    prefix = ""
    if r["rep"]:
        prefix = "repe " if base in (0xA6, 0xAE) else "rep "
    elif r["repne"]:
        prefix = "repne "
    return prefix + name + " " + ", ".join(operands)


def _one_byte(r, op: _Operands) -> str | None:
    code = int(r["opcode"])
    reg3 = (int(r["modrm"]) >> 3) & 7
    osize = op.osize
    if code < 0x40 and code & 7 < 6:
        name = _ALU[code >> 3]
        form = code & 7
        if form in (0, 1):
            return f"{name} {op.rm()}, {op.reg()}"
        if form in (2, 3):
            return f"{name} {op.reg()}, {op.rm()}"
        return f"{name} {op.gpr(0, osize)}, {op.imm()}"
    if 0x40 <= code <= 0x4F:
        return f"{'inc' if code < 0x48 else 'dec'} {op.gpr(code & 7, osize)}"
    if 0x50 <= code <= 0x5F:
        number = (code & 7) | (int(r["rex_b"]) << 3)
        return f"{'push' if code < 0x58 else 'pop'} {op.gpr(number, osize)}"
    if code in (0x68, 0x6A):
        return f"push {op.imm()}"
    if code in (0x69, 0x6B):
        if r["mod"] == 3 and r["reg"] == r["rm"]:
            return f"imul {op.reg()}, {op.imm()}"  # the usual two-operand spelling
        return f"imul {op.reg()}, {op.rm()}, {op.imm()}"
    if code == 0x63:
        if r["op_class"] == OpClass.MOVSXD:
            return f"movsxd {op.reg()}, {op.rm(4)}"
        return f"arpl {op.rm(2)}, {op.reg(2)}"
    if code in (0x6C, 0x6D, 0x6E, 0x6F, 0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE, 0xAF):
        return _string_op(r, op, code & ~1)
    if 0x70 <= code <= 0x7F:
        return f"j{_CONDITIONS[code & 15]} {op.target()}"
    if 0x80 <= code <= 0x83:
        return f"{_ALU[reg3]} {op.rm()}, {op.imm()}"
    if code in (0x84, 0x85):
        return f"test {op.rm()}, {op.reg()}"
    if code in (0x86, 0x87):
        return f"xchg {op.rm()}, {op.reg()}"
    if code in (0x88, 0x89):
        return f"mov {op.rm()}, {op.reg()}"
    if code in (0x8A, 0x8B):
        return f"mov {op.reg()}, {op.rm()}"
    if code == 0x8C:
        return f"mov {op.rm(2 if r['mod'] != 3 else osize)}, {_SEGMENTS[reg3 % 6]}"
    if code == 0x8E:
        return f"mov {_SEGMENTS[reg3 % 6]}, {op.rm(2)}"
    if code == 0x8D:
        return f"lea {op.reg()}, {op.mem(None)}"
    if code == 0x8F:
        return f"pop {op.rm()}"
    if code == 0x90:
        if r["rex_b"]:
            return f"xchg {op.gpr(8, osize)}, {op.gpr(0, osize)}"
        return "pause" if r["rep"] else "nop"
    if 0x91 <= code <= 0x97:
        number = (code & 7) | (int(r["rex_b"]) << 3)
        return f"xchg {op.gpr(number, osize)}, {op.gpr(0, osize)}"
    if code == 0x98:
        return {2: "cbw", 4: "cwde", 8: "cdqe"}[osize]
    if code == 0x99:
        return {2: "cwd", 4: "cdq", 8: "cqo"}[osize]
    if code in (0x9C, 0x9D):
        return ("pushf" if code == 0x9C else "popf") + {2: "", 4: "d", 8: "q"}[osize]
    if 0xA0 <= code <= 0xA3:
        memory = op.mem(osize)
        return f"mov {op.gpr(0, osize)}, {memory}" if code < 0xA2 else f"mov {memory}, {op.gpr(0, osize)}"
    if code in (0xA8, 0xA9):
        return f"test {op.gpr(0, osize)}, {op.imm()}"
    if 0xB0 <= code <= 0xBF:
        number = (code & 7) | (int(r["rex_b"]) << 3)
        return f"mov {op.gpr(number, osize)}, {op.imm()}"
    if code in (0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3):
        count = op.imm(1) if code < 0xD0 else ("0x1" if code < 0xD2 else "cl")
        return f"{_SHIFTS[reg3]} {op.rm()}, {count}"
    if code == 0xC2:
        return f"ret {op.imm(2)}"
    if code == 0xC3:
        return "ret"
    if code in (0xC6, 0xC7):
        if reg3 == 7:
            return f"xabort {op.imm(1)}" if code == 0xC6 else f"xbegin {op.target()}"
        return f"mov {op.rm()}, {op.imm()}"
    if code == 0xC8:
        return f"enter {op.imm(2)}, {hex(int(r['imm2']))}"
    if code in (0xCA, 0xCB):
        return "retf" + (f" {op.imm(2)}" if code == 0xCA else "")
    if code == 0xCD:
        return f"int {op.imm(1)}"
    if code == 0xCF:
        return {2: "iret", 4: "iretd", 8: "iretq"}[osize]
    if 0xE0 <= code <= 0xE3:
        jcxz = {2: "jcxz", 4: "jecxz", 8: "jrcxz"}[int(r["address_size"])]
        return f"{['loopne', 'loope', 'loop', jcxz][code - 0xE0]} {op.target()}"
    if code in (0xE4, 0xE5):
        return f"in {op.gpr(0, osize)}, {op.imm(1)}"
    if code in (0xE6, 0xE7):
        return f"out {op.imm(1)}, {op.gpr(0, osize)}"
    if code in (0xEC, 0xED):
        return f"in {op.gpr(0, osize)}, dx"
    if code in (0xEE, 0xEF):
        return f"out dx, {op.gpr(0, osize)}"
    if code == 0xE8:
        return f"call {op.target()}"
    if code in (0xE9, 0xEB):
        return f"jmp {op.target()}"
    if code in (0x9A, 0xEA):
        far = "call" if code == 0x9A else "jmp"
        return f"{far} far {int(r['imm2']):#x}:{op.imm()}"
    if code in (0xF6, 0xF7):
        if reg3 < 2:
            return f"test {op.rm()}, {op.imm()}"
        return f"{_GROUP3[reg3]} {op.rm()}"
    if code == 0xFE:
        return f"{_GROUP5[reg3]} {op.rm()}"
    if code == 0xFF:
        if reg3 in (3, 5):
            return f"{_GROUP5[reg3]} far {op.mem(None)}"
        size = 8 if reg3 in (2, 4) and r["address_size"] == 8 else osize
        return f"{_GROUP5[reg3]} {op.rm(size)}"
    if code in _BARE_ONE_BYTE:
        return _BARE_ONE_BYTE[code]
    return None


def _map_0f(r, op: _Operands) -> str | None:
    code = int(r["opcode"])
    modrm = int(r["modrm"])
    reg3 = (modrm >> 3) & 7
    mod = int(r["mod"])
    osize = op.osize
    if code in _BARE_0F:
        return _BARE_0F[code]
    if code == 0x07:
        return "sysretq" if r["rex_w"] else "sysret"
    if code == 0x35:
        return "sysexitq" if r["rex_w"] else "sysexit"
    if code == 0x01:
        if mod == 3:
            return _REGISTER_FORMS_0F01.get(modrm)
        name = _GROUP7_MEMORY[reg3]
        return None if name == "-" else f"{name} {op.mem(2 if reg3 in (4, 6) else (1 if reg3 == 7 else None))}"
    if code == 0x1E and r["rep"] and modrm in (0xFA, 0xFB):
        return "endbr64" if modrm == 0xFA else "endbr32"
    if code == 0x1F:
        return f"nop {op.rm()}"
    if code in (0x20, 0x22, 0x21, 0x23):
        control = ("cr" if code in (0x20, 0x22) else "dr") + str(int(r["reg"]))
        register = op.gpr(int(r["rm"]), 8 if r["address_size"] == 8 or r["rex_w"] else 4)
        return f"mov {register}, {control}" if code in (0x20, 0x21) else f"mov {control}, {register}"
    if 0x40 <= code <= 0x4F:
        return f"cmov{_CONDITIONS[code & 15]} {op.reg()}, {op.rm()}"
    if 0x80 <= code <= 0x8F:
        return f"j{_CONDITIONS[code & 15]} {op.target()}"
    if 0x90 <= code <= 0x9F:
        return f"set{_CONDITIONS[code & 15]} {op.rm(1)}"
    if code in (0xA0, 0xA1, 0xA8, 0xA9):
        return f"{'push' if code in (0xA0, 0xA8) else 'pop'} {'fs' if code < 0xA8 else 'gs'}"
    if code in (0xA3, 0xAB, 0xB3, 0xBB):
        name = {0xA3: "bt", 0xAB: "bts", 0xB3: "btr", 0xBB: "btc"}[code]
        return f"{name} {op.rm()}, {op.reg()}"
    if code == 0xBA and reg3 >= 4:
        return f"{['bt', 'bts', 'btr', 'btc'][reg3 - 4]} {op.rm()}, {op.imm(1)}"
    if code in (0xA4, 0xA5, 0xAC, 0xAD):
        name = "shld" if code < 0xA8 else "shrd"
        count = op.imm(1) if code in (0xA4, 0xAC) else "cl"
        return f"{name} {op.rm()}, {op.reg()}, {count}"
    if code == 0xAE:
        if mod == 3:
            if r["rep"] and reg3 < 4:
                return f"{['rdfsbase', 'rdgsbase', 'wrfsbase', 'wrgsbase'][reg3]} {op.gpr(int(r['rm']), osize)}"
            return {5: "lfence", 6: "mfence", 7: "sfence"}.get(reg3)
        if r["opsize_prefix"] and reg3 in (6, 7):
            return f"{'clwb' if reg3 == 6 else 'clflushopt'} {op.mem(1)}"
        name = _GROUP15_MEMORY[reg3]
        if r["rex_w"] and name in _REX_W_SUFFIX_64:
            name += "64"
        size = {2: 4, 3: 4, 7: 1}.get(reg3)
        return f"{name} {op.mem(size)}"
    if code == 0xAF:
        return f"imul {op.reg()}, {op.rm()}"
    if code in (0xB0, 0xB1):
        return f"cmpxchg {op.rm()}, {op.reg()}"
    if code in (0xC0, 0xC1):
        return f"xadd {op.rm()}, {op.reg()}"
    if code in (0xB6, 0xB7, 0xBE, 0xBF):
        name = "movzx" if code < 0xB8 else "movsx"
        return f"{name} {op.reg()}, {op.rm(1 if code & 1 == 0 else 2)}"
    if code == 0xB8 and r["rep"]:
        return f"popcnt {op.reg()}, {op.rm()}"
    if code in (0xBC, 0xBD):
        name = ("tzcnt" if code == 0xBC else "lzcnt") if r["rep"] else ("bsf" if code == 0xBC else "bsr")
        return f"{name} {op.reg()}, {op.rm()}"
    if code == 0xC3:
        return f"movnti {op.mem(osize)}, {op.reg()}"
    if code == 0xC7:
        if mod != 3 and reg3 == 1:
            return f"cmpxchg16b {op.mem(16)}" if r["rex_w"] else f"cmpxchg8b {op.mem(8)}"
        if mod != 3 and reg3 in _GROUP9_MEMORY:
            return _GROUP9_MEMORY[reg3] + ("64" if r["rex_w"] else "") + f" {op.mem(None)}"
        if mod == 3 and reg3 in (6, 7):
            name = "rdrand" if reg3 == 6 else ("rdpid" if r["rep"] else "rdseed")
            return f"{name} {op.gpr(int(r['rm']), 8 if name == 'rdpid' and r['address_size'] == 8 else osize)}"
        return None
    if 0xC8 <= code <= 0xCF:
        return f"bswap {op.gpr((code & 7) | (int(r['rex_b']) << 3), osize)}"
    if code in (0x0D, 0x18) and mod != 3:
        return f"prefetch {op.mem(1)}" if code == 0x0D else None
    return None


def _map_0f38(r, op: _Operands) -> str | None:
    code = int(r["opcode"])
    if code in (0xF0, 0xF1) and not r["repne"]:
        size = 2 if r["opsize_prefix"] and not r["rex_w"] else op.osize
        if code == 0xF0:
            return f"movbe {op.reg(size)}, {op.mem(size)}"
        return f"movbe {op.mem(size)}, {op.reg(size)}"
    return None


def format_instruction(record, data_bytes: bytes) -> str:
    """Intel-syntax text of one VIE_DTYPE record; data_bytes are the instruction's bytes
    (at least record["length"] of them, starting at the instruction)."""
    raw = bytes(data_bytes[: int(record["length"])])
    status = int(record["status"])
    if status != DecodeStatus.OK:
        return f"db {', '.join(f'{b:#04x}' for b in raw)}  ; {DecodeStatus(status).name.lower()}"
    op = _Operands(record, raw)
    text = None
    if record["vex"] == VexKind.NONE:
        opcode_map = int(record["opcode_map"])
        if opcode_map == 0:
            text = _one_byte(record, op)
        elif opcode_map == 1:
            text = _map_0f(record, op)
        elif opcode_map == 2:
            text = _map_0f38(record, op)
    if text is None:
        fallback = "db " + ", ".join(f"{b:#04x}" for b in raw)
        op_class = OpClass(int(record["op_class"]))
        if op_class not in (OpClass.OTHER, OpClass.SSE_AVX):
            fallback += f"  ; {op_class.name.lower()}"
        return fallback
    if record["lock"]:
        text = "lock " + text
    return text
