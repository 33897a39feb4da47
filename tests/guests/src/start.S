/* Entry from the Linux 64-bit boot path: load our own GDT (code 0x08, data 0x10), a stack and
 * an IDT whose stubs report any CPU exception on COM1 (a silent triple fault would look like a
 * guest reset), then guest_start(boot_params). */
    .section .text.start, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    mov %rsi, %rdi
    lea boot_stack_top(%rip), %rsp
    lgdt guest_gdt_ptr(%rip)
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    pushq $0x08
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:  call guest_start
2:  cli
    hlt
    jmp 2b

/* Exception stubs: push a 0 error code where the CPU does not, then the vector. */
    .text
    .macro EXC vec
exc_\vec:
    .if !(\vec == 8 || (\vec >= 10 && \vec <= 14) || \vec == 17 || \vec == 21 || \vec == 29 || \vec == 30)
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
    .endm

    .altmacro
    .set i, 0
    .rept 32
    EXC %i
    .set i, i + 1
    .endr

exc_common:
    mov (%rsp), %rdi        /* vector */
    mov 8(%rsp), %rsi       /* error code */
    mov 16(%rsp), %rdx      /* faulting rip */
    and $-16, %rsp
    call exc_report
3:  cli
    hlt
    jmp 3b

    .macro EXCADDR vec
    .quad exc_\vec
    .endm
    .section .rodata
    .align 8
    .globl exc_stubs
exc_stubs:
    .set i, 0
    .rept 32
    EXCADDR %i
    .set i, i + 1
    .endr

    .data
    .align 16
    .globl guest_gdt, guest_gdt_ptr
guest_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF    /* 0x08: 64-bit code */
    .quad 0x00CF93000000FFFF    /* 0x10: flat data */
    .quad 0x00CFF3000000FFFF    /* 0x18: flat data, ring 3 (lib.c user_call) */
    .quad 0x00AFFB000000FFFF    /* 0x20: 64-bit code, ring 3 */
    .quad 0, 0                  /* 0x28: the 64-bit TSS, filled in by user_call */
guest_gdt_end:
    .align 8
    .word 0, 0, 0
guest_gdt_ptr:
    .word guest_gdt_end - guest_gdt - 1
    .quad guest_gdt

    .bss
    .align 16
    .space 16384
boot_stack_top:
