/* AP start-up: the BSP copies [trampoline_start, trampoline_end) to a page below 1 MiB and
 * sends INIT-SIPI-SIPI with that page as the vector. The AP starts in real mode at CS:0 with
 * CS = page >> 4, turns on PAE, the BSP's CR3 and EFER.LME, then PE and PG together (straight
 * from real mode into long mode) and far-jumps to 64-bit code in the image. */
    .section .rodata.trampoline, "a"
    .code16
    .globl trampoline_start, trampoline_end, tramp_gdtr, tramp_cr3
trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    movl $0x20, %eax                          /* CR4.PAE */
    movl %eax, %cr4
    movl (tramp_cr3 - trampoline_start), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx                    /* IA32_EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    lgdtl (tramp_gdtr - trampoline_start)
    movl %cr0, %eax
    orl $0x80000001, %eax                     /* PG | PE */
    movl %eax, %cr0
    ljmpl $0x08, $ap_entry64
    .align 8
tramp_gdtr:
    .word 0
    .long 0
    .align 4
tramp_cr3:
    .long 0
trampoline_end:

    .text
    .code64
ap_entry64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %eax
    lock xadd %eax, ap_stack_next(%rip)      /* each AP takes its own stack */
    cmp $AP_MAX, %eax
    jae 2f
    inc %eax
    imul $AP_STACK_SIZE, %eax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    call ap_main
2:  cli
    hlt
    jmp 2b
