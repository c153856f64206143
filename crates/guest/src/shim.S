/*
 * remora-guest ring-0 shim.
 *
 * Everything that runs at CPL 0 is in this file, hand-written, in the
 * section .shim.text: no compiled Rust code is ever executed in ring 0.
 * Under kvm_pvm, ring 0 is emulated one instruction at a time (~1.5 us per
 * instruction) and any SSE instruction or int3 there kills the VM, so this
 * code is short, never touches xmm/ymm/zmm/mxcsr, and does everything it
 * can at assembly/link time: the page tables, GDT, TSSs and IDT are static
 * data (built with .rept); nothing is looped over at run time.
 *
 * Boot (BSP): PVH entry in 32-bit protected mode (paging off, ebx =
 * hvm_start_info) -> lgdt -> PAE, CR3, EFER.LME, CR0.PG -> 64-bit ->
 * lidt, per-CPU kernel stack and TSS, LAPIC LINT0 masked -> iretq to
 * ring 3 at the Rust entry remora_entry(cpu_index, start_info_paddr) with
 * IF=1. About 45 emulated instructions.
 *
 * Boot (AP): INIT-SIPI-SIPI (sent from ring 3 by the BSP) starts the AP in
 * real mode at the copy of shim_trampoline_start..shim_trampoline_end that
 * ring 3 placed in a free page below 1 MiB; the trampoline loads the GDT,
 * sets CR0.PE and far-jumps to shim_ap32 (in place, above 1 MiB), which
 * joins the BSP path. The CPU index comes from `lock xadd` on
 * shim_cpu_count, so the BSP (which always comes first) is CPU 0.
 *
 * Syscall ABI (ring 3 -> ring 0): `int3` (vector 3, a DPL=3 interrupt
 * gate, so interrupts are off inside the handler). `int 0x80` arrives as
 * #UD under kvm_pvm, so it is not used.
 *     in:  rax = number, rdi = arg0, rsi = arg1, rdx = arg2
 *     out: rax = result (or -1 for an unknown number)
 *     clobbered: rax, rcx, rdx, rsi, rdi; every other register and the
 *     user stack are preserved (the handler runs on the TSS RSP0 stack).
 *     The caller must have RFLAGS.DF = 0 (the Rust ABI guarantees it).
 *   0 WRITE(port, ptr, len)     rep outsb of len bytes at ptr to port
 *   1 OUT(port, value, size)    outb/outw/outl for size 1/2/4
 *   2 IN(port, size) -> value   inb/inw/inl for size 1/2/4, zero-extended
 *   3 HALT_IF(ptr, expected)    if the u32 at ptr == expected: sti; hlt
 *                               (race-free sleep, woken by any interrupt)
 *   4 TRIPLE_FAULT()            load an empty IDT and fault: never returns
 *
 * Interrupts: vector 0x40 is the wake-up IPI (EOI, iretq), 0x41-0x4f the
 * LAPIC timer and device interrupts (lock incl shim_irq_count, EOI, iretq),
 * 0xff the LAPIC spurious vector (iretq). Exceptions 0-31 (except 3) print one line
 *   remora-guest: fault vector=0x0e err=0x... rip=0x... cs=0x... rsp=0x... cr2=0x...
 * on COM1 and then triple-fault.
 *
 * Memory (see linker.ld): page tables, GDT, TSSs and IDT in .shim.data;
 * kernel stacks (4 KiB per CPU) and user stacks (64 KiB per CPU) in the
 * NOLOAD section .stacks. The identity map covers 0-4 GiB with 2 MiB
 * pages, every page user-accessible and writable; 3-4 GiB (MMIO: virtio,
 * IOAPIC, LAPIC) is uncached (PCD|PWT).
 */

.set SHIM_MAX_CPUS,     64
.set SHIM_KSTACK_SIZE,  4096
.set SHIM_USTACK_SIZE,  65536
.set SHIM_TSS_STRIDE,   128

.set SHIM_KERNEL_CS32,  0x08
.set SHIM_KERNEL_CS64,  0x10
.set SHIM_KERNEL_DS,    0x18
.set SHIM_USER_DS,      0x23
.set SHIM_USER_CS64,    0x2b
.set SHIM_TSS_SEL0,     0x30

.set SHIM_COM1,         0x3f8
.set SHIM_LAPIC_EOI,    0xfee000b0
.set SHIM_LAPIC_LINT0,  0xfee00350
.set SHIM_LVT_MASKED,   0x10000

/* CR4: PAE | OSFXSR | OSXMMEXCPT (TSD clear: rdtsc works in ring 3). */
.set SHIM_CR4,          0x620
/* CR0: PG | NE | ET | MP | PE (EM clear, so ring 3 may use SSE). */
.set SHIM_CR0,          0x80000033
.set SHIM_MSR_EFER,     0xc0000080
.set SHIM_EFER_LME,     0x100

/* Page-directory entry flags: P | RW | US | PS, and PWT | PCD for MMIO. */
.set SHIM_PDE_RAM,      0x87
.set SHIM_PDE_MMIO,     0x9f
/* Upper-level entries: P | RW | US. */
.set SHIM_PTE_TABLE,    0x07

.set SHIM_NR_SYSCALLS,  5

/* ------------------------------------------------------------------------
 * PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", 32-bit entry.
 */
.pushsection .note.Xen, "a", @note
.balign 4
.long 4
.long 4
.long 18
.asciz "Xen"
.balign 4
.long pvh_start32
.balign 4
.popsection

/* ------------------------------------------------------------------------
 * Ring-0 code.
 */
.pushsection .shim.text, "ax", @progbits

/* ---- 32-bit entry, BSP (PVH) ---- */
.code32
.globl pvh_start32
pvh_start32:
    movl %ebx, shim_start_info
    lgdt shim_gdtr
    /* fall through */

/* ---- 32-bit, common to the BSP and the APs; data segments are flat ---- */
shim_common32:
    movl $SHIM_CR4, %eax
    movl %eax, %cr4
    movl $shim_pml4, %eax
    movl %eax, %cr3
    movl $SHIM_MSR_EFER, %ecx
    movl $SHIM_EFER_LME, %eax
    xorl %edx, %edx
    wrmsr
    movl $SHIM_CR0, %eax
    movl %eax, %cr0
    ljmp $SHIM_KERNEL_CS64, $shim_long64

/* ---- 32-bit, APs arrive here from the trampoline ---- */
.globl shim_ap32
shim_ap32:
    movl $SHIM_KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    jmp shim_common32

/* ---- 64-bit, every CPU ---- */
.code64
shim_long64:
    movl $SHIM_KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    lidt shim_idtr(%rip)
    movl $1, %eax
    lock xaddl %eax, shim_cpu_count(%rip)
    cmpl $SHIM_MAX_CPUS, %eax
    jae shim_park
    /* kernel stack: shim_kstacks + (cpu + 1) * 4 KiB (also the TSS RSP0) */
    movl %eax, %ecx
    shll $12, %ecx
    leaq shim_kstacks + SHIM_KSTACK_SIZE(%rcx), %rsp
    /* TSS selector: 0x30 + cpu * 16 */
    movl %eax, %ecx
    shll $4, %ecx
    addl $SHIM_TSS_SEL0, %ecx
    ltr %cx
    /*
     * Mask LINT0 before interrupts are enabled: a BIOS (SeaBIOS) leaves the
     * 8259 PIC programmed with IRQ 0 at vector 8 and wired to the BSP's
     * LINT0 as ExtINT, so its timer would arrive as a fake #DF. The shim
     * assumes the architectural LAPIC base, as it never moves it.
     */
    movl $SHIM_LAPIC_LINT0, %edx
    movl $SHIM_LVT_MASKED, (%rdx)
    /* user stack: shim_ustacks + (cpu + 1) * 64 KiB - 8 (as if called) */
    movl %eax, %ecx
    shll $16, %ecx
    leaq shim_ustacks + SHIM_USTACK_SIZE - 8(%rcx), %rcx
    pushq $SHIM_USER_DS
    pushq %rcx
    pushq $0x202
    pushq $SHIM_USER_CS64
    pushq $remora_entry
    movl %eax, %edi
    movl shim_start_info(%rip), %esi
    iretq

/* A CPU beyond SHIM_MAX_CPUS stays here for good. */
shim_park:
    cli
1:  hlt
    jmp 1b

/*
 * Interrupt and exception entry points. Everything an IDT gate points to is
 * in this block, which the linker script keeps inside one 64 KiB window so
 * that the gates can be built statically from __shim_vec_lo/__shim_vec_hi.
 * Exception stubs are 16 bytes apart: stub N is at shim_vectors + 16 * N.
 */
.balign 1024
.globl shim_vectors
shim_vectors:
.set shim_vec, 0
.rept 32
    .balign 16
    .if (shim_vec == 8) || ((shim_vec >= 10) && (shim_vec <= 14)) || (shim_vec == 17) || (shim_vec == 21) || (shim_vec == 29) || (shim_vec == 30)
    pushq $shim_vec
    .else
    pushq $0
    pushq $shim_vec
    .endif
    jmp shim_fault
    .set shim_vec, shim_vec + 1
.endr

/* Wake-up IPI (vector 0x40): EOI and return. */
.balign 16
shim_ipi:
    pushq %rax
    xorl %eax, %eax
    movabsl %eax, SHIM_LAPIC_EOI
    popq %rax
    iretq

/*
 * Device and timer interrupts (vectors 0x41-0x4f): count, EOI, return.
 * Ring 3 reads shim_irq_count before its last look at the rings and sleeps
 * with HALT_IF(&shim_irq_count, seen), so an interrupt that arrives in
 * between is never lost; it then polls the rings itself.
 */
.balign 16
shim_irq:
    pushq %rax
    lock incl shim_irq_count(%rip)
    xorl %eax, %eax
    movabsl %eax, SHIM_LAPIC_EOI
    popq %rax
    iretq

/* LAPIC spurious interrupt (vector 0xff): no EOI. */
.balign 16
shim_spurious:
    iretq

/* Syscall (int3 from ring 3); see the ABI at the top of this file. */
.balign 16
shim_syscall:
    cmpq $SHIM_NR_SYSCALLS, %rax
    jae shim_sys_bad
    jmpq *shim_syscall_table(,%rax,8)
.globl shim_vectors_end
shim_vectors_end:

shim_sys_bad:
    movq $-1, %rax
    iretq

/* WRITE(port = rdi, ptr = rsi, len = rdx) */
shim_sys_write:
    movq %rdx, %rcx
    movl %edi, %edx
    rep outsb
    iretq

/* OUT(port = rdi, value = rsi, size = rdx) */
shim_sys_out:
    movl %esi, %eax
    xchgq %rdi, %rdx
    cmpl $1, %edi
    je 1f
    cmpl $2, %edi
    je 2f
    outl %eax, %dx
    iretq
1:  outb %al, %dx
    iretq
2:  outw %ax, %dx
    iretq

/* IN(port = rdi, size = rsi) -> rax */
shim_sys_in:
    movl %edi, %edx
    xorl %eax, %eax
    cmpl $1, %esi
    je 1f
    cmpl $2, %esi
    je 2f
    inl %dx, %eax
    iretq
1:  inb %dx, %al
    iretq
2:  inw %dx, %ax
    iretq

/*
 * HALT_IF(ptr = rdi, expected = rsi): interrupts are off here (interrupt
 * gate); `sti; hlt` cannot lose a wake-up because sti delays interrupts by
 * one instruction. The interrupt handler returns to the iretq below.
 */
shim_sys_halt_if:
    cmpl %esi, (%rdi)
    jne 1f
    sti
    hlt
1:  iretq

/*
 * TRIPLE_FAULT: empty IDT, then a #GP (non-canonical load): #GP -> #DF ->
 * shutdown. (int3 would be an emulation failure under kvm_pvm instead.)
 */
shim_sys_triple_fault:
shim_triple_fault:
    lidt shim_zero_idtr(%rip)
    movabsq $0x8000000000000000, %rax
    movq (%rax), %rax
    ud2
1:  hlt
    jmp 1b

/*
 * Exceptions: print the frame on COM1, then triple-fault.
 * Stack: vector, error code, rip, cs, rflags, rsp, ss.
 */
shim_fault:
    cld
    movq %rsp, %rbx
    subq $256, %rsp
    movq %rsp, %rdi
    leaq shim_msg_vector(%rip), %rsi
    movl $shim_msg_vector_len, %ecx
    rep movsb
    movq 0(%rbx), %rax
    movl $2, %ecx
    call shim_hex
    leaq shim_msg_err(%rip), %rsi
    movl $shim_msg_field_len, %ecx
    rep movsb
    movq 8(%rbx), %rax
    movl $16, %ecx
    call shim_hex
    leaq shim_msg_rip(%rip), %rsi
    movl $shim_msg_field_len, %ecx
    rep movsb
    movq 16(%rbx), %rax
    movl $16, %ecx
    call shim_hex
    leaq shim_msg_cs(%rip), %rsi
    movl $shim_msg_cs_len, %ecx
    rep movsb
    movq 24(%rbx), %rax
    movl $4, %ecx
    call shim_hex
    leaq shim_msg_rsp(%rip), %rsi
    movl $shim_msg_field_len, %ecx
    rep movsb
    movq 40(%rbx), %rax
    movl $16, %ecx
    call shim_hex
    leaq shim_msg_cr2(%rip), %rsi
    movl $shim_msg_field_len, %ecx
    rep movsb
    movq %cr2, %rax
    movl $16, %ecx
    call shim_hex
    movb $10, (%rdi)
    incq %rdi
    movq %rdi, %rcx
    subq %rsp, %rcx
    movq %rsp, %rsi
    movl $SHIM_COM1, %edx
    rep outsb
    jmp shim_triple_fault

/* Write the low ecx hex digits of rax at rdi (advanced); clobbers rax, rcx, rdx. */
shim_hex:
    movl $16, %edx
    subl %ecx, %edx
    shll $2, %edx
    xchgl %ecx, %edx
    shlq %cl, %rax
    movl %edx, %ecx
1:  rolq $4, %rax
    movl %eax, %edx
    andl $15, %edx
    movb shim_hexdigits(%rdx), %dl
    movb %dl, (%rdi)
    incq %rdi
    decl %ecx
    jnz 1b
    ret

/*
 * AP start-up trampoline (real mode). Ring 3 copies it to a free 4 KiB page
 * P below 1 MiB and sends SIPI vector P >> 12, so it runs at CS = P >> 4,
 * IP = 0: every reference inside is relative to shim_trampoline_start.
 */
.code16
.balign 16
.globl shim_trampoline_start
shim_trampoline_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl shim_tramp_gdtr - shim_trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SHIM_KERNEL_CS32, $shim_ap32
.balign 8
shim_tramp_gdtr:
    .word shim_gdt_end - shim_gdt - 1
    .long shim_gdt
.globl shim_trampoline_end
shim_trampoline_end:
.code64

.popsection

/* ------------------------------------------------------------------------
 * Read-only data used by ring 0.
 */
.pushsection .shim.rodata, "a", @progbits
.balign 8
shim_syscall_table:
    .quad shim_sys_write
    .quad shim_sys_out
    .quad shim_sys_in
    .quad shim_sys_halt_if
    .quad shim_sys_triple_fault

shim_hexdigits:
    .ascii "0123456789abcdef"

shim_msg_vector:
    .ascii "remora-guest: fault vector=0x"
.set shim_msg_vector_len, . - shim_msg_vector
/* the fields below are all " xxx=0x" of the same length (7) except cs */
shim_msg_err:
    .ascii " err=0x"
.set shim_msg_field_len, . - shim_msg_err
shim_msg_rip:
    .ascii " rip=0x"
shim_msg_rsp:
    .ascii " rsp=0x"
shim_msg_cr2:
    .ascii " cr2=0x"
shim_msg_cs:
    .ascii " cs=0x"
.set shim_msg_cs_len, . - shim_msg_cs
.popsection

/* ------------------------------------------------------------------------
 * Static ring-0 data: page tables, GDT, TSSs, IDT, boot variables.
 */
.pushsection .shim.data.pagetables, "aw", @progbits
.balign 4096
.globl shim_pml4
shim_pml4:
    .quad shim_pdpt + SHIM_PTE_TABLE
    .fill 511, 8, 0
shim_pdpt:
    .quad shim_pd + 0x0000 + SHIM_PTE_TABLE
    .quad shim_pd + 0x1000 + SHIM_PTE_TABLE
    .quad shim_pd + 0x2000 + SHIM_PTE_TABLE
    .quad shim_pd + 0x3000 + SHIM_PTE_TABLE
    .fill 508, 8, 0
/* 2048 2 MiB pages: 0-3 GiB RAM (cached), 3-4 GiB MMIO (uncached). */
shim_pd:
.set shim_pde, 0
.rept 1536
    .quad (shim_pde << 21) | SHIM_PDE_RAM
    .set shim_pde, shim_pde + 1
.endr
.rept 512
    .quad (shim_pde << 21) | SHIM_PDE_MMIO
    .set shim_pde, shim_pde + 1
.endr
.popsection

.pushsection .shim.data, "aw", @progbits

/* TSSs, 128 bytes apart; the linker script keeps them in one 64 KiB window. */
.balign 8192
.globl shim_tss
shim_tss:
.set shim_cpu, 0
.rept SHIM_MAX_CPUS
    .long 0                                                 /* reserved */
    .quad shim_kstacks + (shim_cpu + 1) * SHIM_KSTACK_SIZE  /* RSP0 */
    .quad 0, 0                                              /* RSP1, RSP2 */
    .quad 0                                                 /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0                               /* IST1-7 */
    .quad 0                                                 /* reserved */
    .word 0                                                 /* reserved */
    .word 104                                               /* no I/O bitmap */
    .fill SHIM_TSS_STRIDE - 104, 1, 0
    .set shim_cpu, shim_cpu + 1
.endr

.balign 16
.globl shim_gdt
shim_gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00cf9a000000ffff    /* 0x08 kernel code, 32-bit (AP trampoline) */
    .quad 0x00af9a000000ffff    /* 0x10 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x18 kernel data */
    .quad 0x00cff2000000ffff    /* 0x20 user data (DPL 3): selector 0x23 */
    .quad 0x00affa000000ffff    /* 0x28 user code, 64-bit (DPL 3): 0x2b */
/* 0x30 + 16 * cpu: 64-bit available TSS of each CPU */
.set shim_cpu, 0
.rept SHIM_MAX_CPUS
    .word 103
    .word __shim_tss_lo + shim_cpu * SHIM_TSS_STRIDE
    .byte __shim_tss_b2
    .byte 0x89
    .byte 0
    .byte __shim_tss_b3
    .long 0
    .long 0
    .set shim_cpu, shim_cpu + 1
.endr
shim_gdt_end:

/* lgdt operand for 32-bit mode: 16-bit limit, 32-bit base. */
.balign 8
shim_gdtr:
    .word shim_gdt_end - shim_gdt - 1
    .long shim_gdt

/* IDT: 256 interrupt gates (not-present except those below). */
.macro SHIM_GATE off, attr
    .word __shim_vec_lo + (\off)
    .word SHIM_KERNEL_CS64
    .byte 0
    .byte \attr
    .word __shim_vec_hi
    .long 0
    .long 0
.endm

.balign 16
shim_idt:
.set shim_vec, 0
.rept 32
    .if shim_vec == 3
    SHIM_GATE (shim_syscall - shim_vectors), 0xee
    .else
    SHIM_GATE (shim_vec * 16), 0x8e
    .endif
    .set shim_vec, shim_vec + 1
.endr
    .fill (0x40 - 32) * 16, 1, 0
    SHIM_GATE (shim_ipi - shim_vectors), 0x8e           /* 0x40 */
.rept 15                                                /* 0x41-0x4f */
    SHIM_GATE (shim_irq - shim_vectors), 0x8e
.endr
    .fill (0xff - 0x50) * 16, 1, 0
    SHIM_GATE (shim_spurious - shim_vectors), 0x8e      /* 0xff */
shim_idt_end:

.balign 8
    .word 0, 0, 0
shim_idtr:
    .word shim_idt_end - shim_idt - 1
    .quad shim_idt
    .word 0, 0, 0
shim_zero_idtr:
    .word 0
    .quad 0

.balign 8
/* hvm_start_info physical address, saved by the BSP for everyone. */
.globl shim_start_info
shim_start_info:
    .long 0
/* Device/timer interrupts taken (vectors 0x41-0x4f), all CPUs. */
.globl shim_irq_count
shim_irq_count:
    .long 0
/* Number of CPUs that reached 64-bit mode; the next CPU's index. */
.globl shim_cpu_count
shim_cpu_count:
    .long 0
.popsection

/* ------------------------------------------------------------------------
 * Stacks: not part of the loaded image (NOLOAD), never zeroed.
 */
.pushsection .stacks, "aw", @nobits
.balign 4096
.globl shim_kstacks
shim_kstacks:
    .skip SHIM_MAX_CPUS * SHIM_KSTACK_SIZE
.globl shim_ustacks
shim_ustacks:
    .skip SHIM_MAX_CPUS * SHIM_USTACK_SIZE
.popsection
