/*
 * A 512-byte x86 boot sector for the QEMU plugin tests (16-bit real mode).
 *
 * At start it counts its own boots at 0x9004 (never reset: a guest that
 * started again reads 2), zeroes the counter at 0x9000, fills
 * 0x10000..0x5ffff with the pattern "LUO!" (0x214f554c), writes the marker
 * 0x600d600d at 0x9008, says hello on COM1, then increments the 32-bit
 * counter at 0x9000 forever. The host reads all of it with QMP `xp`.
 *
 * Built by tests/plugins/conftest.py:
 *   as --32 -o boot.o boot.S
 *   ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o boot.img boot.o
 */
    .code16
    .text
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $0x7c00, %sp
    cld
    addl $1, 0x9004             /* boots */
    movl $0, 0x9000             /* counter */
    movw $0x1000, %bx           /* fill 64 KiB segments 0x1000..0x5000 */
1:  movw %bx, %es
    xorw %di, %di
    movl $0x214f554c, %eax      /* "LUO!" */
    movw $0x4000, %cx           /* 16 Ki dwords = 64 KiB */
    rep stosl
    addw $0x1000, %bx
    cmpw $0x6000, %bx
    jne 1b
    movl $0x600d600d, 0x9008    /* marker: the fill is done */
    movw $hello, %si
2:  lodsb
    testb %al, %al
    jz 3f
    movw $0x3f8, %dx
    outb %al, %dx
    jmp 2b
3:  addl $1, 0x9000             /* the counter */
    jmp 3b
hello:
    .asciz "luo guest up\r\n"
    .org 510
    .byte 0x55, 0xaa
