/*
 * test-guest CPL0 monitor (AT&T syntax, assembled by rustc's global_asm!).
 *
 * Everything here runs at CPL0, which the PVM host KVM executes in an instruction
 * emulator (about 1 us per instruction, and several instructions kill the VM: int3,
 * int $n, SSE arithmetic, x87, xsave, popcnt, rdtscp, ...). So this file only uses
 * plain integer instructions, keeps loops short and does no rep string operations.
 * The real work runs at CPL3 (Rust, native speed) and calls back in with `ud2`.
 *
 * Selectors: 0x08 kernel code64, 0x10 kernel data, 0x18 kernel code32,
 *            0x23 user data, 0x2b user code64, 0x30 + 16*cpu TSS of cpu.
 */

.set KCODE64, 0x08
.set KDATA, 0x10
.set KCODE32, 0x18
.set UDATA, 0x23
.set UCODE64, 0x2b
.set TSS_SEL0, 0x30

.set MAX_CPUS, 256
.set KSTACK_SHIFT, 12
.set KSTACK_SIZE, 4096
.set USTACK_SIZE, 0x40000
.set COM1, 0x3f8
.set ACPI_SLEEP_PORT, 0x600
.set POWEROFF_VALUE, 0x34          /* (SLP_TYP 5 << 2) | SLP_EN */
.set LAPIC, 0xfee00000
.set CR4_BITS, 0x620               /* PAE | OSFXSR | OSXMMEXCPT */
.set EFER_MSR, 0xc0000080

/* ud2 service numbers (rax); arguments in rdi, rsi, rdx; result in rax */
.set SVC_OUTB, 0
.set SVC_OUTW, 1
.set SVC_OUTL, 2
.set SVC_INB, 3
.set SVC_INW, 4
.set SVC_INL, 5
.set SVC_WRITE, 6
.set SVC_HLT, 7
.set SVC_LAPIC_ENABLE, 8
.set SVC_IPI, 9
.set SVC_CPUID, 10
.set SVC_RDMSR, 11
.set SVC_WRMSR, 12
.set SVC_WAIT_IRQ, 13
.set SVC_IRQ_COUNT, 14
.set SVC_PARK, 15
.set SVC_NMI_COUNT, 16
.set SVC_COUNT, 17
/* External interrupt vectors the monitor handles: IRQ_VECTOR .. IRQ_VECTOR + IRQ_VECTORS - 1.
 * Each is counted (irq_counts) and EOIed at the LAPIC; the tests program the sources. */
.set IRQ_VECTOR, 0x30
.set IRQ_VECTORS, 16

/* ------------------------------------------------------------------------- */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", 32-bit entry.     */
.section .note.xen, "a", @note
.p2align 2
    .long 4                 /* namesz */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_entry32

/* ------------------------------------------------------------------------- */
/* PVH entry: 32-bit protected mode, paging off, ebx = hvm_start_info.        */
.section .text.pvh32, "ax", @progbits
.code32
.global pvh_entry32
pvh_entry32:
    cli
    movl %ebx, boot_info
    movl $0, boot_protocol
    movl $msg_entry_pvh, %esi
    movw $COM1, %dx
1:  movb (%esi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incl %esi
    jmp 1b
2:  lgdt gdt_ptr
    ljmp $KCODE32, $3f
3:  movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $EFER_MSR, %ecx
    rdmsr
    orl $0x100, %eax         /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xfffffff3, %eax   /* clear EM, TS */
    orl $0x80000023, %eax    /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $KCODE64, $bsp_common64

/* ------------------------------------------------------------------------- */
/* Linux 64-bit boot protocol entry (0x100200): long mode, rsi = boot_params. */
.section .text.entry64, "ax", @progbits
.code64
.global linux_entry64
linux_entry64:
    cli
    movq %rsi, boot_info(%rip)
    movl $1, boot_protocol(%rip)
    leaq msg_entry_linux(%rip), %rsi
    movw $COM1, %dx
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incq %rsi
    jmp 1b
2:  movq %cr4, %rax
    orq $CR4_BITS, %rax
    movq %rax, %cr4
    movq %cr0, %rax
    andq $0xfffffffffffffff3, %rax
    orq $0x22, %rax
    movq %rax, %cr0
    jmp bsp_common64

/* ------------------------------------------------------------------------- */
.section .text.monitor, "ax", @progbits
.code64

/* Common BSP set-up in long mode: own GDT, page tables, IDT, TSS, then CPL3. */
bsp_common64:
    lgdt gdt_ptr(%rip)
    movl $pml4, %eax
    movq %rax, %cr3
    leaq kstacks + KSTACK_SIZE(%rip), %rsp
    pushq $KCODE64
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    call idt_fill
    xorl %edi, %edi
    call cpu_setup
    /* iretq to the CPL3 start-up stub with IF=0 */
    pushq $UDATA
    leaq ustack + USTACK_SIZE(%rip), %rax
    pushq %rax
    pushq $0x2
    pushq $UCODE64
    leaq user_start(%rip), %rax
    pushq %rax
    movl boot_protocol(%rip), %edi
    movq boot_info(%rip), %rsi
    xorl %eax, %eax
    xorl %ebx, %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    iretq

/* Fill the 32 exception gates and the gates of IRQ_VECTOR..: stubs are 16 bytes apart and lie
 * in one 64 KiB page below 4 GiB, so only the low 16 bits of the offset change. */
idt_fill:
    leaq isr_stubs(%rip), %rax
    leaq idt(%rip), %rdi
    movl $32, %ecx
    call gates_fill
    leaq irq_stubs(%rip), %rax
    leaq idt(%rip), %rdi
    addq $IRQ_VECTOR * 16, %rdi
    movl $IRQ_VECTORS, %ecx
    /* fall through */

/* rax = first stub, rdi = first gate, ecx = gates: interrupt gates to consecutive stubs. */
gates_fill:
    movq %rax, %rdx
    andl $0xffff, %eax
    shrq $16, %rdx
    shlq $48, %rdx
    orq %rdx, %rax
    movq $0x00008e0000080000, %rdx   /* present, DPL0, 64-bit interrupt gate, selector 0x08 */
    orq %rdx, %rax
1:  movq %rax, (%rdi)
    movq $0, 8(%rdi)
    addq $16, %rax
    addq $16, %rdi
    decl %ecx
    jnz 1b
    ret

/* External interrupts: only ever taken at CPL0 inside svc_wait_irq (CPL3 runs with IF=0).
 * Each stub pushes rax and puts its index (vector - IRQ_VECTOR) there. */
.balign 256
irq_stubs:
.set vec, 0
.rept IRQ_VECTORS
    .balign 16
    pushq %rax
    movl $vec, %eax
    jmp irq_common
    .set vec, vec + 1
.endr
irq_common:
    pushq %rbx
    leaq irq_counts(%rip), %rbx
    lock incl (%rbx, %rax, 4)
    movl $LAPIC, %ebx
    movl $0, 0xb0(%rbx)             /* EOI */
    popq %rbx
    popq %rax
    iretq

/* cpu_setup(edi = cpu index): TSS (rsp0 = top of the cpu's kernel stack), its GDT
 * descriptor, ltr, lidt. Clobbers rax, rbx, rcx, rdx. */
cpu_setup:
    movl %edi, %eax
    shlq $7, %rax
    leaq tss_array(%rip), %rbx
    addq %rax, %rbx                 /* rbx = this cpu's TSS */
    leal 1(%rdi), %eax
    shlq $KSTACK_SHIFT, %rax
    leaq kstacks(%rip), %rcx
    addq %rcx, %rax
    movq %rax, 4(%rbx)              /* rsp0 */
    movw $0x68, 0x66(%rbx)          /* I/O map base beyond the limit: no bitmap */
    movq %rbx, %rax
    andl $0xffffff, %eax
    shlq $16, %rax
    orq $0x67, %rax                 /* limit */
    movq $0x0000890000000000, %rcx  /* present, type 9 (available 64-bit TSS) */
    orq %rcx, %rax
    movq %rbx, %rcx
    shrq $24, %rcx
    andl $0xff, %ecx
    shlq $56, %rcx
    orq %rcx, %rax
    movl %edi, %ecx
    shlq $4, %rcx
    leaq gdt_tss(%rip), %rdx
    movq %rax, (%rdx, %rcx)
    movq $0, 8(%rdx, %rcx)
    leal TSS_SEL0(%rcx), %eax
    ltr %ax
    lidt idt_ptr(%rip)
    ret

/* ------------------------------------------------------------------------- */
/* Exception stubs and the common handler.                                    */
.balign 512
isr_stubs:
.set vec, 0
.rept 32
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
.endr

/* Frame offsets after the pushes below. */
.set F_R15, 0
.set F_RBP, 64
.set F_RDI, 72
.set F_RSI, 80
.set F_RDX, 88
.set F_RCX, 96
.set F_RBX, 104
.set F_RAX, 112
.set F_VEC, 120
.set F_ERR, 128
.set F_RIP, 136
.set F_CS, 144
.set F_RFLAGS, 152
.set F_RSP, 160

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cmpq $2, F_VEC(%rsp)
    je nmi_taken
    cmpq $6, F_VEC(%rsp)
    jne fatal
    testb $3, F_CS(%rsp)
    jz fatal
    movq F_RIP(%rsp), %rbx
    cmpw $0x0b0f, (%rbx)            /* really a ud2? */
    jne fatal
    cmpq $SVC_COUNT, %rax
    jae fatal
    leaq svc_table(%rip), %rbx
    jmp *(%rbx, %rax, 8)

svc_outb:
    movl %esi, %eax
    movl %edi, %edx
    outb %al, %dx
    jmp svc_done
svc_outw:
    movl %esi, %eax
    movl %edi, %edx
    outw %ax, %dx
    jmp svc_done
svc_outl:
    movl %esi, %eax
    movl %edi, %edx
    outl %eax, %dx
    jmp svc_done
svc_inb:
    movl %edi, %edx
    xorl %eax, %eax
    inb %dx, %al
    jmp svc_ret_rax
svc_inw:
    movl %edi, %edx
    xorl %eax, %eax
    inw %dx, %ax
    jmp svc_ret_rax
svc_inl:
    movl %edi, %edx
    inl %dx, %eax
    jmp svc_ret_rax
svc_write:                          /* rdi = bytes, rsi = length */
    movw $COM1, %dx
1:  testq %rsi, %rsi
    jz svc_done
    movb (%rdi), %al
    outb %al, %dx
    incq %rdi
    decq %rsi
    jmp 1b
svc_hlt:
    hlt
    jmp svc_done
svc_wait_irq:                       /* waits for any interrupt; then as svc_irq_count */
    sti
    hlt                             /* sti's shadow: an interrupt pending now wakes this hlt */
    cli
svc_irq_count:                      /* rdi = vector; returns how many were taken (0 if unknown) */
    movl %edi, %eax
    subl $IRQ_VECTOR, %eax
    cmpl $IRQ_VECTORS, %eax
    jae 1f
    leaq irq_counts(%rip), %rbx
    movl (%rbx, %rax, 4), %eax
    jmp svc_ret_rax
1:  xorl %eax, %eax
    jmp svc_ret_rax
svc_nmi_count:                      /* rdi = CPU index; returns the NMIs it has taken */
    xorl %eax, %eax
    cmpq $MAX_CPUS, %rdi
    jae svc_ret_rax
    leaq nmi_counts(%rip), %rbx
    movl (%rbx, %rdi, 4), %eax
    jmp svc_ret_rax
svc_park:                           /* rdi = u32 set to 1, then halts for good with IF=0 */
    movl $1, (%rdi)
1:  cli
    hlt
    jmp 1b
svc_lapic_enable:                   /* software-enable the xAPIC; returns its APIC ID */
    movl $LAPIC, %ebx
    movl $0x1ff, 0xf0(%rbx)
    movl 0x20(%rbx), %eax
    shrl $24, %eax
    jmp svc_ret_rax
svc_ipi:                            /* rdi = destination APIC ID, rsi = ICR low */
    movl $LAPIC, %ebx
    movl %edi, %eax
    shll $24, %eax
    movl %eax, 0x310(%rbx)
    movl %esi, 0x300(%rbx)
    movl $1000, %ecx
1:  movl 0x300(%rbx), %eax
    testl $0x1000, %eax             /* delivery status: send pending */
    jz 2f
    decl %ecx
    jnz 1b
2:  movl %ecx, %eax                 /* 0 = still pending after polling */
    jmp svc_ret_rax
svc_cpuid:                          /* rdi = leaf, rsi = subleaf -> rax, rdi, rsi, rdx */
    movl %edi, %eax
    movl %esi, %ecx
    cpuid
    movq %rax, F_RAX(%rsp)
    movq %rbx, F_RDI(%rsp)
    movq %rcx, F_RSI(%rsp)
    movq %rdx, F_RDX(%rsp)
    jmp svc_done
svc_rdmsr:                          /* rdi = msr -> rax */
    movl %edi, %ecx
    rdmsr
    shlq $32, %rdx
    movl %eax, %eax
    orq %rdx, %rax
    jmp svc_ret_rax
svc_wrmsr:                          /* rdi = msr, rsi = value */
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
    wrmsr
    jmp svc_done

svc_ret_rax:
    movq %rax, F_RAX(%rsp)
svc_done:
    addq $2, F_RIP(%rsp)            /* skip the ud2 */
frame_return:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

/* An NMI (the VMM's vm.nmi), at CPL3 or in the monitor: counted for the CPU whose kernel stack
 * the frame is on (index = (rsp - kstacks) >> KSTACK_SHIFT), then back to where it came. */
nmi_taken:
    movq %rsp, %rax
    leaq kstacks(%rip), %rbx
    subq %rbx, %rax
    shrq $KSTACK_SHIFT, %rax
    cmpq $MAX_CPUS, %rax
    jae frame_return
    leaq nmi_counts(%rip), %rbx
    lock incl (%rbx, %rax, 4)
    jmp frame_return

/* Any other exception: report on COM1 and power off, so a test fails fast. */
fatal:
    leaq msg_fatal(%rip), %rsi
    call kputs
    movq F_VEC(%rsp), %rax
    call kputhex
    leaq msg_err(%rip), %rsi
    call kputs
    movq F_ERR(%rsp), %rax
    call kputhex
    leaq msg_rip(%rip), %rsi
    call kputs
    movq F_RIP(%rsp), %rax
    call kputhex
    leaq msg_cs(%rip), %rsi
    call kputs
    movq F_CS(%rsp), %rax
    call kputhex
    leaq msg_rsp(%rip), %rsi
    call kputs
    movq F_RSP(%rsp), %rax
    call kputhex
    leaq msg_cr2(%rip), %rsi
    call kputs
    movq %cr2, %rax
    call kputhex
    leaq msg_rax(%rip), %rsi
    call kputs
    movq F_RAX(%rsp), %rax
    call kputhex
    leaq msg_nl(%rip), %rsi
    call kputs
    movw $ACPI_SLEEP_PORT, %dx
    movb $POWEROFF_VALUE, %al
    outb %al, %dx
1:  cli
    hlt
    jmp 1b

/* kputs(rsi = NUL-terminated string). Clobbers rax, rdx, rsi. */
kputs:
    movw $COM1, %dx
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incq %rsi
    jmp 1b
2:  ret

/* kputhex(rax): 16 hex digits. Clobbers rax, rcx, rdx, rbx. */
kputhex:
    movq %rax, %rbx
    movl $16, %ecx
    movw $COM1, %dx
1:  rolq $4, %rbx
    movl %ebx, %eax
    andl $0xf, %eax
    cmpl $10, %eax
    jb 2f
    addl $('a' - '0' - 10), %eax
2:  addl $'0', %eax
    outb %al, %dx
    decl %ecx
    jnz 1b
    ret

/* ------------------------------------------------------------------------- */
/* Application processors. The real-mode trampoline below is copied (by the   */
/* CPL3 code) to AP_TRAMPOLINE (0x40000, SIPI vector 0x40) and runs with      */
/* CS = 0x4000, IP = 0; it only loads the GDT and jumps into the image.       */
.global ap_trampoline_start
.global ap_trampoline_end
.balign 16
ap_trampoline_start:
.code16
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_tramp_gdt_ptr - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $KCODE32, $ap_entry32
.balign 8
ap_tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

.code32
ap_entry32:
    movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $EFER_MSR, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffff3, %eax
    orl $0x80000023, %eax
    movl %eax, %cr0
    ljmp $KCODE64, $ap_entry64

.code64
ap_entry64:
    movl $1, %eax
    lock xaddl %eax, ap_next_index(%rip)
    cmpl $MAX_CPUS, %eax
    jae ap_park
    movl %eax, %edi
    leal 1(%rdi), %eax
    shlq $KSTACK_SHIFT, %rax
    leaq kstacks(%rip), %rsp
    addq %rax, %rsp
    call cpu_setup
    movl $LAPIC, %ebx
    movl 0x20(%rbx), %eax
    shrl $24, %eax
    leaq ap_apic_ids(%rip), %rbx
    movl %eax, (%rbx, %rdi, 4)
    lock incl ap_reported(%rip)
    /* A scenario that runs code on its APs (cpuhotplug) sets ap_user_entry and a user stack
     * for this APIC ID: go on at CPL3 (IF=0) in ap_user_start, rdi = APIC ID, rsi = index. */
    movq ap_user_entry(%rip), %rcx
    testq %rcx, %rcx
    jz ap_park
    cmpl $MAX_CPUS, %eax
    jae ap_park
    leaq ap_user_stacks(%rip), %rbx
    movq (%rbx, %rax, 8), %rdx
    testq %rdx, %rdx
    jz ap_park
    movl %edi, %esi
    movl %eax, %edi
    pushq $UDATA
    pushq %rdx
    pushq $0x2
    pushq $UCODE64
    leaq ap_user_start(%rip), %rax
    pushq %rax
    iretq
ap_park:
    cli
    hlt
    jmp ap_park

/* ------------------------------------------------------------------------- */
/* CPL3 start-up stub: zero .bss natively, then call the Rust main.           */
.global user_start
user_start:
    movq %rdi, %r12
    movq %rsi, %r13
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movq %r12, %rdi
    movq %r13, %rsi
    call guest_main
1:  ud2                              /* guest_main never returns: rax is garbage -> fatal */
    jmp 1b

/* CPL3, on an AP (see ap_entry64): call the scenario's ap_user_entry (rdi = APIC ID, rsi =
 * index), which does not return. */
ap_user_start:
    call *ap_user_entry(%rip)
1:  ud2
    jmp 1b

/* ------------------------------------------------------------------------- */
.section .rodata.monitor, "a", @progbits
msg_entry_pvh:   .asciz "test-guest: entry pvh\n"
msg_entry_linux: .asciz "test-guest: entry linux\n"
msg_fatal:       .asciz "\nFAIL exception: vector="
msg_err:         .asciz " error="
msg_rip:         .asciz " rip="
msg_cs:          .asciz " cs="
msg_rsp:         .asciz " rsp="
msg_cr2:         .asciz " cr2="
msg_rax:         .asciz " rax="
msg_nl:          .asciz "\n"

.balign 8
svc_table:
    .quad svc_outb, svc_outw, svc_outl, svc_inb, svc_inw, svc_inl, svc_write, svc_hlt
    .quad svc_lapic_enable, svc_ipi, svc_cpuid, svc_rdmsr, svc_wrmsr, svc_wait_irq
    .quad svc_irq_count, svc_park, svc_nmi_count

/* ------------------------------------------------------------------------- */
.section .data.monitor, "aw", @progbits
.balign 8
.global boot_protocol
.global boot_info
.global ap_next_index
.global ap_reported
.global ap_apic_ids
.global ap_user_entry
.global ap_user_stacks
boot_info:      .quad 0
boot_protocol:  .long 0
ap_next_index:  .long 1              /* index 0 is the BSP */
ap_reported:    .long 0
.balign 8
irq_counts:     .fill IRQ_VECTORS, 4, 0
nmi_counts:     .fill MAX_CPUS, 4, 0
ap_apic_ids:    .fill MAX_CPUS, 4, 0xffffffff
/* Set at CPL3: where a started AP goes on at CPL3 (0: it parks), and the top of its user stack
 * by APIC ID (0: it parks). */
ap_user_entry:  .quad 0
ap_user_stacks: .fill MAX_CPUS, 8, 0

.balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff         /* 0x08 kernel code64 */
    .quad 0x00cf92000000ffff         /* 0x10 kernel data */
    .quad 0x00cf9a000000ffff         /* 0x18 kernel code32 */
    .quad 0x00cff2000000ffff         /* 0x20 user data (0x23) */
    .quad 0x00affa000000ffff         /* 0x28 user code64 (0x2b) */
gdt_tss:
    .fill 2 * MAX_CPUS, 8, 0         /* 0x30 + 16*cpu: TSS descriptors */
gdt_end:

.balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
.balign 8
idt_ptr:
    .word (IRQ_VECTOR + IRQ_VECTORS) * 16 - 1
    .quad idt
.balign 16
idt:
    .fill 2 * (IRQ_VECTOR + IRQ_VECTORS), 8, 0

/* Static identity map of the first 4 GiB with 2 MiB pages, all U/S=1 so CPL3 can
 * reach RAM, the LAPIC/IOAPIC and the PCI hole; 3-4 GiB (device hole) is PCD|PWT.
 * Above 4 GiB the Rust code adds what it needs (paging.rs: the 64-bit PCI window):
 * these tables are user-writable. */
.balign 4096
.global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
.set pdpt_i, 0
.rept 4
    .quad pd + pdpt_i * 4096 + 0x7
    .set pdpt_i, pdpt_i + 1
.endr
    .fill 508, 8, 0
pd:
.set pde_i, 0
.rept 2048
    .if (pde_i >= 1536) && (pde_i < 2048)
    .quad (pde_i << 21) | 0x9f       /* P RW US PWT PCD PS */
    .else
    .quad (pde_i << 21) | 0x87       /* P RW US PS */
    .endif
    .set pde_i, pde_i + 1
.endr

/* ------------------------------------------------------------------------- */
/* Not part of the file: the user stack, TSSs and kernel stacks, in that order: */
/* what the boot CPU uses (its stacks and TSS) lies low, the APs' kernel stacks   */
/* at the end, so a guest that stays on the boot CPU touches no memory above the  */
/* image's first 4 MiB (one 2 MiB huge page less with the VMM's thp=on).          */
.section .kstack, "aw", @nobits
.balign 4096
ustack:
    .skip USTACK_SIZE
.balign 128
tss_array:
    .skip MAX_CPUS * 128
.balign 4096
kstacks:
    .skip MAX_CPUS * KSTACK_SIZE
    .skip KSTACK_SIZE
