/*
 * hvjit's exit micro-benchmarks: one multiboot v1 guest (ELF32, linked at 1 MiB) that any
 * multiboot loader (hvjit, QEMU's -kernel, GRUB) boots unchanged.
 *
 * Command line: "[image] [n=ITERATIONS] [run=TEST,TEST,...]"; tokens without a known key
 * (such as the image name QEMU and GRUB put first) are ignored. Defaults: n=1000, every test.
 * For each test: set-up, a warm-up of n/8+1 iterations, then n iterations timed with rdtsc
 * in batches of up to 50. Output on COM1, one line per test:
 *
 *     vmexit NAME ITERATIONS CYCLES BEST BATCH
 *                                          CYCLES: TSC cycles of all timed iterations;
 *                                          BEST: of the fastest run of BATCH of them
 *     vmexit NAME unavailable REASON       the test cannot run on this VMM/host
 *     vmexit NAME error REASON             it ran but misbehaved (e.g. lost interrupts)
 *     vmexit NAME unknown                  no such test
 *     vmexit done                          then exit code 0 through isa-debug-exit (0xf4)
 *
 * A CPU exception prints "vmexit fault VECTOR WORD WORD" and exits with code 3.
 * The tests run in long mode at CPL0 (CR8 exists only in 64-bit mode).
 */

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0                /* ELF: the loader reads the program headers */
        .set MB_BOOT_MAGIC, 0x2BADB002
        .set COM1, 0x3f8
        .set EXIT_PORT, 0xf4
        .set TESTDEV_PORT, 0xe0         /* pc-testdev's 32-bit scratch register */
        .set TESTDEV_MMIO, 0xff000000   /* pc-testdev's MMIO scratch RAM */
        .set LAPIC, 0xfee00000
        .set LAPIC_VERSION, 0x30
        .set LAPIC_EOI, 0xb0
        .set LAPIC_SVR, 0xf0
        .set LAPIC_ICR_LOW, 0x300
        .set LAPIC_LVT_TIMER, 0x320
        .set LAPIC_TIMER_INITIAL, 0x380
        .set LAPIC_TIMER_DIVIDE, 0x3e0
        .set MSR_APIC_BASE, 0x1b
        .set MSR_EFER, 0xc0000080
        .set TIMER_VECTOR, 0x40
        .set IPI_VECTOR, 0x41
        .set WATCHDOG_VECTOR, 0x42
        .set SPURIOUS_VECTOR, 0xff
        .set WATCHDOG_COUNT, 250000000 /* 0.25 s: KVM's APIC timer counts at 1 GHz */
        .set ICR_SELF_FIXED, 0x44000    /* destination shorthand "self", assert, fixed */
        .set HYPERCALL_NR, 0            /* no such KVM hypercall: returns -KVM_ENOSYS */
        .set DEFAULT_ITERATIONS, 1000
        .set BATCH, 50
        .set PROBE_SPINS, 100000

        .section .text
        .code32
        .align 4
multiboot_header:
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .globl _start
_start:
        cli
        mov $stack_top, %esp
        xor %esi, %esi
        cmp $MB_BOOT_MAGIC, %eax
        jne 1f
        testl $4, (%ebx)                /* MBI flags bit 2: cmdline is valid */
        jz 1f
        mov 16(%ebx), %esi
1:      mov %esi, cmdline
        /* Long mode: PAE, 4 GiB identity-mapped in 2 MiB pages, EFER.LME, paging. */
        mov %cr4, %eax
        or $0x20, %eax
        mov %eax, %cr4
        mov $pml4, %eax
        mov %eax, %cr3
        mov $MSR_EFER, %ecx
        rdmsr
        or $0x100, %eax
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax
        mov %eax, %cr0
        lgdt gdt_descriptor
        ljmp $0x08, $long_mode

        .code64
long_mode:
        mov $0x10, %eax
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %ss
        mov %eax, %fs
        mov %eax, %gs
        mov $stack_top, %esp
        call setup_idt
        lidt idt_descriptor(%rip)
        /* Mask both 8259s: the only interrupts are the LAPIC's we ask for. */
        mov $0xff, %al
        out %al, $0x21
        out %al, $0xa1
        call parse_cmdline
        mov run_list(%rip), %rsi
        test %rsi, %rsi
        jnz 2f
        lea tests(%rip), %r13           /* no run=: every test in table order */
1:      cmpq $0, (%r13)
        je 3f
        call run_test
        add $24, %r13
        jmp 1b
2:      call run_named                  /* rsi: "name,name,..." ending at ' ' or NUL */
3:      lea s_done(%rip), %rsi
        call puts
        xor %eax, %eax
exit:   out %eax, $EXIT_PORT
4:      cli
        hlt
        jmp 4b

/* ---- the command line ------------------------------------------------------------------ */

parse_cmdline:                          /* sets iterations and run_list */
        movq $DEFAULT_ITERATIONS, iterations(%rip)
        movq $0, run_list(%rip)
        mov cmdline(%rip), %esi
        test %esi, %esi
        jz 9f
1:      movzbl (%rsi), %eax             /* token start: skip spaces */
        test %al, %al
        jz 9f
        cmp $' ', %al
        jne 2f
        inc %rsi
        jmp 1b
2:      cmpw $0x3d6e, (%rsi)            /* "n=" */
        jne 3f
        add $2, %rsi
        call parse_decimal
        test %rax, %rax
        jz 5f
        mov %rax, iterations(%rip)
        jmp 5f
3:      cmpl $0x3d6e7572, (%rsi)        /* "run=" */
        jne 5f
        add $4, %rsi
        mov %rsi, run_list(%rip)
5:      movzbl (%rsi), %eax             /* skip to the end of the token */
        test %al, %al
        jz 9f
        cmp $' ', %al
        je 1b
        inc %rsi
        jmp 5b
9:      ret

parse_decimal:                          /* rsi -> rax; rsi left at the first non-digit */
        xor %eax, %eax
1:      movzbl (%rsi), %ecx
        sub $'0', %ecx
        cmp $9, %ecx
        ja 2f
        imul $10, %rax, %rax
        add %rcx, %rax
        inc %rsi
        jmp 1b
2:      ret

run_named:                              /* rsi: comma-separated names */
1:      lea tests(%rip), %r13
2:      mov (%r13), %rdi
        test %rdi, %rdi
        jz 4f                           /* not in the table */
        call name_matches
        jc 3f
        add $24, %r13
        jmp 2b
3:      push %rsi
        call run_test
        pop %rsi
        jmp 6f
4:      push %rsi                       /* "vmexit NAME unknown" */
        lea s_prefix(%rip), %rsi
        call puts
        mov (%rsp), %rsi
        call put_token
        lea s_unknown(%rip), %rsi
        call puts
        pop %rsi
6:      movzbl (%rsi), %eax             /* next name */
        test %al, %al
        jz 9f
        cmp $' ', %al
        je 9f
        inc %rsi
        cmp $',', %al
        je 1b
        jmp 6b
9:      ret

name_matches:                           /* CF=1 if the token at rsi equals the string at rdi */
        push %rsi
1:      movzbl (%rdi), %eax
        movzbl (%rsi), %ecx
        test %al, %al
        jz 2f
        cmp %al, %cl
        jne 8f
        inc %rdi
        inc %rsi
        jmp 1b
2:      test %cl, %cl                   /* table name ended: the token must end too */
        jz 7f
        cmp $' ', %cl
        je 7f
        cmp $',', %cl
        je 7f
8:      pop %rsi
        clc
        ret
7:      pop %rsi
        stc
        ret

/* ---- running one test ------------------------------------------------------------------ */

/* r13: the test's table entry (name, set-up, loop); cpuid clobbers rbx. The timed
 * iterations run in batches of BATCH, each timed on its own: r12 sums them, r15 keeps the
 * fastest full batch (a batch the host did not preempt shows the exit's own cost). */
run_test:
        call *8(%r13)                   /* set-up: rax = 0, or a reason string */
        test %rax, %rax
        jnz 8f
        mov iterations(%rip), %r8
        shr $3, %r8                     /* warm-up: n/8 + 1 iterations */
        inc %r8
        call *16(%r13)
        mov iterations(%rip), %r14      /* r14: iterations left */
        mov $BATCH, %eax
        cmp %rax, %r14
        cmovb %r14, %rax
        mov %rax, batch(%rip)           /* min(BATCH, n) */
        xor %r12d, %r12d
        mov $-1, %r15
1:      mov batch(%rip), %r10
        cmp %r10, %r14
        cmovb %r14, %r10                /* r10: this batch's iterations */
        mov %r10, %r8
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, %r11
        call *16(%r13)                  /* loops keep r10-r15 */
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        sub %r11, %rax
        add %rax, %r12
        cmp batch(%rip), %r10
        jne 2f                          /* a short last batch is not comparable */
        cmp %r15, %rax
        cmovb %rax, %r15
2:      sub %r10, %r14
        jnz 1b
        call check_interrupts
        test %rax, %rax
        jnz 6f
        lea s_prefix(%rip), %rsi        /* "vmexit NAME N TOTAL BEST BATCH" */
        call puts
        mov (%r13), %rsi
        call puts
        mov iterations(%rip), %rax
        call putsp_dec
        mov %r12, %rax
        call putsp_dec
        mov %r15, %rax
        call putsp_dec
        mov batch(%rip), %rax
        call putsp_dec
        mov $'\n', %al
        jmp putc
6:      ret
8:      lea s_unavailable(%rip), %rdi
9:      push %rax
        push %rdi
        lea s_prefix(%rip), %rsi
        call puts
        mov (%r13), %rsi
        call puts
        pop %rsi
        call puts
        pop %rsi
        call puts
        mov $'\n', %al
        jmp putc

/* Interrupt-driven tests must have taken one interrupt per iteration: rax = 0, or 1 after
 * printing "vmexit NAME error interrupts expected E received R". */
check_interrupts:
        xor %eax, %eax
        mov expected_interrupts(%rip), %rcx
        test %rcx, %rcx
        jz 9f
        movq $0, expected_interrupts(%rip)
        mov iterations(%rip), %rdx
        shr $3, %rdx
        inc %rdx
        add iterations(%rip), %rdx      /* warm-up + timed */
        cmp (%rcx), %rdx
        je 9f
        push (%rcx)
        push %rdx
        lea s_prefix(%rip), %rsi
        call puts
        mov (%r13), %rsi
        call puts
        lea s_lost(%rip), %rsi
        call puts
        pop %rax
        call putdec
        lea s_received(%rip), %rsi
        call puts
        pop %rax
        call putdec
        mov $'\n', %al
        call putc
        mov $1, %eax
9:      ret

/* ---- set-ups: rax = 0 when the test can run, else a reason -------------------------------- */

setup_none:
        xor %eax, %eax
        ret

setup_hypercall:                        /* the vendor's own instruction: no patching needed */
        xor %eax, %eax
        cpuid
        xor %r9d, %r9d                  /* r9 = 1: AMD/Hygon (vmmcall) */
        cmp $0x68747541, %ebx           /* "Auth"enticAMD */
        je 1f
        cmp $0x6f677948, %ebx           /* "Hygo"nGenuine */
        je 1f
        lea loop_vmcall(%rip), %rax
        jmp 2f
1:      inc %r9d
        lea loop_vmmcall(%rip), %rax
2:      mov %rax, hypercall_loop(%rip)
        /* One probe under a watchdog: a VMM may never complete the instruction (a KVM that
         * emulates ring 0 rewrites it to the "native" form and re-executes it forever). */
        call setup_lapic
        test %rax, %rax
        jnz 9f
        movq $0, hypercall_stuck(%rip)
        movl $WATCHDOG_VECTOR, LAPIC_LVT_TIMER(%rdi)
        movl $WATCHDOG_COUNT, LAPIC_TIMER_INITIAL(%rdi)
        mov $HYPERCALL_NR, %eax
        test %r9d, %r9d
        jz 3f
        sti
probe_vmmcall:
        vmmcall
        jmp 4f
3:      sti
probe_vmcall:
        vmcall
4:      cli
        movl $0, LAPIC_TIMER_INITIAL(%rdi)
        movl $TIMER_VECTOR, LAPIC_LVT_TIMER(%rdi)
        lea s_hypercall_stuck(%rip), %rax
        cmpq $0, hypercall_stuck(%rip)
        jne 9f
        xor %eax, %eax
9:      ret

setup_lapic:                            /* xAPIC at 0xfee00000, software-enabled, divide by 1 */
        mov $MSR_APIC_BASE, %ecx
        rdmsr
        test $0x400, %eax               /* x2APIC mode: no MMIO interface */
        jnz 8f
        test $0x800, %eax
        jnz 1f
        or $0x800, %eax                 /* globally enable it */
        wrmsr
1:      mov $LAPIC, %rdi
        mov LAPIC_VERSION(%rdi), %eax
        cmp $0xffffffff, %eax
        je 9f
        test %eax, %eax
        je 9f
        movl $(0x100 | SPURIOUS_VECTOR), LAPIC_SVR(%rdi)
        movl $TIMER_VECTOR, LAPIC_LVT_TIMER(%rdi)      /* one-shot, unmasked */
        movl $0xb, LAPIC_TIMER_DIVIDE(%rdi)
        xor %eax, %eax
        ret
8:      lea s_x2apic(%rip), %rax
        ret
9:      lea s_no_lapic(%rip), %rax
        ret

setup_hlt:                              /* the timer must interrupt a spin before we halt on it */
        call setup_lapic
        test %rax, %rax
        jnz 9f
        movq $0, timer_count(%rip)
        movl $1, LAPIC_TIMER_INITIAL(%rdi)
        mov $PROBE_SPINS, %ecx
        sti
1:      cmpq $0, timer_count(%rip)
        jne 2f
        dec %ecx
        jnz 1b
2:      cli
        lea s_no_timer(%rip), %rax
        cmpq $0, timer_count(%rip)
        je 9f
        movq $0, timer_count(%rip)
        lea timer_count(%rip), %rax
        mov %rax, expected_interrupts(%rip)
        xor %eax, %eax
9:      ret

setup_self_ipi:
        call setup_lapic
        test %rax, %rax
        jnz 9f
        movq $0, ipi_count(%rip)
        movl $(ICR_SELF_FIXED | IPI_VECTOR), LAPIC_ICR_LOW(%rdi)
        mov $PROBE_SPINS, %ecx
        sti
1:      cmpq $0, ipi_count(%rip)
        jne 2f
        dec %ecx
        jnz 1b
2:      cli
        lea s_no_ipi(%rip), %rax
        cmpq $0, ipi_count(%rip)
        je 9f
        movq $0, ipi_count(%rip)
        lea ipi_count(%rip), %rax
        mov %rax, expected_interrupts(%rip)
        xor %eax, %eax
9:      ret

/* ---- the timed loops: r8 iterations, one exit (or exit-class instruction) each ---------- */

loop_cpuid:
1:      xor %eax, %eax
        cpuid
        dec %r8
        jnz 1b
        ret

loop_hypercall:
        jmp *hypercall_loop(%rip)
loop_vmcall:
1:      mov $HYPERCALL_NR, %eax
        vmcall
        dec %r8
        jnz 1b
        ret
loop_vmmcall:
1:      mov $HYPERCALL_NR, %eax
        vmmcall
        dec %r8
        jnz 1b
        ret

loop_cr8_read:
1:      mov %cr8, %rax
        dec %r8
        jnz 1b
        ret

loop_cr8_write:
        xor %eax, %eax
1:      mov %rax, %cr8
        dec %r8
        jnz 1b
        ret

loop_pio_read:
1:      inl $TESTDEV_PORT, %eax
        dec %r8
        jnz 1b
        ret

loop_pio_write:
1:      outl %eax, $TESTDEV_PORT
        dec %r8
        jnz 1b
        ret

loop_mmio_read:
        mov $TESTDEV_MMIO, %edi
1:      mov (%rdi), %eax
        dec %r8
        jnz 1b
        ret

loop_mmio_write:
        mov $TESTDEV_MMIO, %edi
1:      mov %eax, (%rdi)
        dec %r8
        jnz 1b
        ret

loop_hlt:                               /* arm the one-shot timer, halt, wake on its interrupt */
        mov $LAPIC, %rdi
1:      movl $1, LAPIC_TIMER_INITIAL(%rdi)
        sti
        hlt
        cli
        dec %r8
        jnz 1b
        ret

loop_self_ipi:                          /* send, then wait with IF=1 until it arrived */
        mov $LAPIC, %rdi
        mov ipi_count(%rip), %r9
1:      inc %r9
        movl $(ICR_SELF_FIXED | IPI_VECTOR), LAPIC_ICR_LOW(%rdi)
        sti                             /* (hardware takes it right after sti's shadow; a */
2:      cmp ipi_count(%rip), %r9        /* ring-0 emulator may take a few instructions) */
        jne 2b
        cli
        dec %r8
        jnz 1b
        ret

/* ---- interrupts and faults -------------------------------------------------------------- */

setup_idt:
        lea idt(%rip), %rdi
        xor %ecx, %ecx
1:      mov $spurious_handler, %eax
        cmp $32, %ecx
        jae 2f
        mov %ecx, %eax
        shl $4, %eax
        add $fault_stubs, %eax
2:      call set_gate
        add $16, %rdi
        inc %ecx
        cmp $256, %ecx
        jb 1b
        lea idt+16*TIMER_VECTOR(%rip), %rdi
        mov $timer_handler, %eax
        call set_gate
        lea idt+16*IPI_VECTOR(%rip), %rdi
        mov $ipi_handler, %eax
        call set_gate
        lea idt+16*WATCHDOG_VECTOR(%rip), %rdi
        mov $watchdog_handler, %eax
        call set_gate
        ret

set_gate:                               /* rdi: the 16-byte gate; eax: handler below 4 GiB */
        mov %ax, (%rdi)
        movw $0x08, 2(%rdi)
        movw $0x8e00, 4(%rdi)           /* present, DPL0, 64-bit interrupt gate */
        shr $16, %eax
        mov %ax, 6(%rdi)
        movq $0, 8(%rdi)
        ret

timer_handler:
        push %rax
        incq timer_count(%rip)
        jmp eoi
ipi_handler:
        push %rax
        incq ipi_count(%rip)
eoi:    mov $LAPIC, %eax
        movl $0, LAPIC_EOI(%rax)
        pop %rax
        iretq

watchdog_handler:                       /* a hypercall probe hung: skip its 3-byte instruction */
        push %rax
        mov 8(%rsp), %rax               /* the interrupted rip */
        cmp $probe_vmcall, %eax
        je 1f
        cmp $probe_vmmcall, %eax
        jne eoi
1:      addq $3, 8(%rsp)
        movq $1, hypercall_stuck(%rip)
        jmp eoi

spurious_handler:
        incq spurious_count(%rip)
        iretq

        .align 16
fault_stubs:
        .set vector, 0
        .rept 32
        .align 16
        push $vector
        jmp fault
        .set vector, vector + 1
        .endr

fault:                                  /* print the vector and the two words above it */
        lea s_fault(%rip), %rsi
        call puts
        mov (%rsp), %rax
        call putdec
        mov $' ', %al
        call putc
        mov 8(%rsp), %rax
        call puthex
        mov $' ', %al
        call putc
        mov 16(%rsp), %rax
        call puthex
        mov $'\n', %al
        call putc
        mov $3, %eax
        jmp exit

/* ---- COM1 output --------------------------------------------------------------------------- */

putc:                                   /* al; the UART is never busy for a VMM's 16550 */
        push %rdx
        mov $COM1, %dx
        out %al, %dx
        pop %rdx
        ret

puts:                                   /* NUL-terminated string at rsi */
1:      movzbl (%rsi), %eax
        test %al, %al
        jz 2f
        call putc
        inc %rsi
        jmp 1b
2:      ret

put_token:                              /* rsi up to ',', ' ' or NUL */
1:      movzbl (%rsi), %eax
        test %al, %al
        jz 2f
        cmp $' ', %al
        je 2f
        cmp $',', %al
        je 2f
        call putc
        inc %rsi
        jmp 1b
2:      ret

putsp_dec:                              /* ' ', then rax in decimal */
        push %rax
        mov $' ', %al
        call putc
        pop %rax
putdec:                                 /* rax, unsigned decimal */
        lea numbuf_end(%rip), %rdi
        mov $10, %ecx
1:      xor %edx, %edx
        div %rcx
        add $'0', %dl
        dec %rdi
        mov %dl, (%rdi)
        test %rax, %rax
        jnz 1b
        mov %rdi, %rsi
        jmp puts

puthex:                                 /* rax, 16 hex digits */
        mov %rax, %rdx
        mov $16, %ecx
1:      rol $4, %rdx
        mov %edx, %eax
        and $0xf, %eax
        lea hexdigits(%rip), %rsi
        movzbl (%rsi,%rax), %eax
        call putc
        dec %ecx
        jnz 1b
        ret

/* ---- data ------------------------------------------------------------------------------- */

        .section .data
        .align 8
/* name, set-up, loop (64-bit words; .long pairs as an ELF32 object has no 64-bit relocations) */
tests:
        .long n_cpuid, 0, setup_none, 0, loop_cpuid, 0
        .long n_hypercall, 0, setup_hypercall, 0, loop_hypercall, 0
        .long n_cr8_read, 0, setup_none, 0, loop_cr8_read, 0
        .long n_cr8_write, 0, setup_none, 0, loop_cr8_write, 0
        .long n_pio_read, 0, setup_none, 0, loop_pio_read, 0
        .long n_pio_write, 0, setup_none, 0, loop_pio_write, 0
        .long n_mmio_read, 0, setup_none, 0, loop_mmio_read, 0
        .long n_mmio_write, 0, setup_none, 0, loop_mmio_write, 0
        .long n_hlt, 0, setup_hlt, 0, loop_hlt, 0
        .long n_self_ipi, 0, setup_self_ipi, 0, loop_self_ipi, 0
        .quad 0

n_cpuid:        .asciz "cpuid"
n_hypercall:    .asciz "hypercall"
n_cr8_read:     .asciz "cr8-read"
n_cr8_write:    .asciz "cr8-write"
n_pio_read:     .asciz "pio-read"
n_pio_write:    .asciz "pio-write"
n_mmio_read:    .asciz "mmio-read"
n_mmio_write:   .asciz "mmio-write"
n_hlt:          .asciz "hlt"
n_self_ipi:     .asciz "self-ipi"

s_prefix:       .asciz "vmexit "
s_done:         .asciz "vmexit done\n"
s_unknown:      .asciz " unknown\n"
s_unavailable:  .asciz " unavailable "
s_fault:        .asciz "vmexit fault "
s_lost:         .asciz " error interrupts expected "
s_received:     .asciz " received "
s_x2apic:       .asciz "the LAPIC is in x2APIC mode (no MMIO interface)"
s_no_lapic:     .asciz "no xAPIC at 0xfee00000"
s_no_timer:     .asciz "the LAPIC timer interrupt never arrived"
s_no_ipi:       .asciz "the self-IPI was never delivered"
s_hypercall_stuck: .asciz "the hypercall instruction did not complete within 0.25 s"
hexdigits:      .ascii "0123456789abcdef"

        .align 8
cmdline:        .quad 0
iterations:     .quad 0
run_list:       .quad 0
batch:          .quad 0
hypercall_loop: .quad 0
hypercall_stuck: .quad 0
timer_count:    .quad 0
ipi_count:      .quad 0
spurious_count: .quad 0
expected_interrupts: .quad 0
numbuf:         .space 24
numbuf_end:     .byte 0

        .align 8
gdt:
        .quad 0
        .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
        .quad 0x00cf92000000ffff        /* 0x10: data */
gdt_end:
gdt_descriptor:
        .word gdt_end - gdt - 1
        .long gdt
        .align 8
idt_descriptor:
        .word 256 * 16 - 1
        .long idt, 0

/* Identity map of the low 4 GiB in 2 MiB pages; the top GiB (LAPIC, MMIO) uncached. */
        .align 4096
pml4:
        .long pdpt + 3, 0
        .fill 511, 8, 0
pdpt:
        .long pd + 3, 0
        .long pd + 0x1000 + 3, 0
        .long pd + 0x2000 + 3, 0
        .long pd + 0x3000 + 3, 0
        .fill 508, 8, 0
pd:
        .set page, 0
        .rept 1536
        .quad page | 0x83               /* present, writable, 2 MiB */
        .set page, page + 0x200000
        .endr
        .rept 512
        .quad page | 0x9b               /* + PWT, PCD */
        .set page, page + 0x200000
        .endr

        .section .bss
        .align 4096
idt:    .space 256 * 16
        .space 16384
stack_top:
