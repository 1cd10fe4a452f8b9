"""The kernel's ioctl request encoding (``include/uapi/asm-generic/ioctl.h``).

A request number packs a direction, an argument size, a type byte and a number::

    bits 31..30  direction (none / write / read / read+write)
    bits 29..16  size of the argument
    bits 15..8   type ("magic"), 0xBA for /dev/liveupdate
    bits  7..0   number

These are the generic encodings used by x86, arm64 and riscv; alpha, mips,
powerpc and sparc use other direction bits and are not supported.
"""

from __future__ import annotations

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_DIRBITS = 2

IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode a request number like the kernel's ``_IOC()``."""
    if not 0 <= direction < 1 << IOC_DIRBITS:
        raise ValueError(f"ioctl direction {direction} out of range")
    if not 0 <= type_ < 1 << IOC_TYPEBITS:
        raise ValueError(f"ioctl type {type_:#x} out of range")
    if not 0 <= nr < 1 << IOC_NRBITS:
        raise ValueError(f"ioctl number {nr:#x} out of range")
    if not 0 <= size < 1 << IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} out of range")
    return (
        direction << IOC_DIRSHIFT
        | size << IOC_SIZESHIFT
        | type_ << IOC_TYPESHIFT
        | nr << IOC_NRSHIFT
    )


def io(type_: int, nr: int) -> int:
    """``_IO(type, nr)``: no argument size in the number."""
    return ioc(IOC_NONE, type_, nr, 0)


def ior(type_: int, nr: int, size: int) -> int:
    """``_IOR(type, nr, T)``: the kernel writes ``sizeof(T)`` bytes."""
    return ioc(IOC_READ, type_, nr, size)


def iow(type_: int, nr: int, size: int) -> int:
    """``_IOW(type, nr, T)``: the kernel reads ``sizeof(T)`` bytes."""
    return ioc(IOC_WRITE, type_, nr, size)


def iowr(type_: int, nr: int, size: int) -> int:
    """``_IOWR(type, nr, T)``: the kernel reads and writes ``sizeof(T)`` bytes."""
    return ioc(IOC_READ | IOC_WRITE, type_, nr, size)


def ioc_type(request: int) -> int:
    """``_IOC_TYPE()``."""
    return (request >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)


def ioc_nr(request: int) -> int:
    """``_IOC_NR()``."""
    return (request >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)


def ioc_size(request: int) -> int:
    """``_IOC_SIZE()``."""
    return (request >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)


def ioc_dir(request: int) -> int:
    """``_IOC_DIR()``."""
    return (request >> IOC_DIRSHIFT) & ((1 << IOC_DIRBITS) - 1)
