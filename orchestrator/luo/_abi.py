"""Struct layouts and request numbers of both /dev/liveupdate ABIs.

Layouts are declared field by field with C types and laid out with the C
alignment rules of the LP64 ABI (x86_64, arm64), so offsets and sizes come
from the declaration, as they do for the compiler; the tests check them
against the reference values.

*Merged* ABI (Linux 6.19+, ``include/uapi/linux/liveupdate.h``): every request
is ``_IO(0xBA, nr)`` and every struct starts with ``__u32 size``. The kernel
rejects a size below the struct's minimum with EINVAL and non-zero bytes past
the part it knows with E2BIG.

*RFC* ABI (the July 2025 seed series): a global state machine with
``_IOR``/``_IOW``/``_IOWR`` requests that encode the argument size.
"""

from __future__ import annotations

import struct

from orchestrator._compat import TYPE_CHECKING, final

from ._ioc import io, ior, iow, iowr

if TYPE_CHECKING:
    from typing import Final

LIVEUPDATE_IOCTL_TYPE: Final = 0xBA
SESSION_NAME_LENGTH: Final = 64
"""``LIVEUPDATE_SESSION_NAME_LENGTH``, the NUL included: names hold 63 bytes."""

# C type -> (struct code, size, alignment) on LP64 little- or big-endian hosts;
# the byte order is the host's, as for the kernel.
_CTYPES: Final[dict[str, tuple[str, int, int]]] = {
    "__u8": ("B", 1, 1),
    "__u32": ("I", 4, 4),
    "__s32": ("i", 4, 4),
    "int": ("i", 4, 4),
    "__aligned_u64": ("Q", 8, 8),
    "__u64": ("Q", 8, 8),
}


@final
class FieldInfo:
    """Where one field of a struct lives.

    (A plain class, not a dataclass: this module is on the restore path, and
    ``dataclasses`` costs milliseconds to import.)
    """

    __slots__ = ("ctype", "name", "offset", "size")

    def __init__(self, name: str, ctype: str, offset: int, size: int) -> None:
        self.name = name
        self.ctype = ctype
        self.offset = offset
        self.size = size

    def __repr__(self) -> str:
        return f"<FieldInfo {self.name}: {self.ctype} @{self.offset} ({self.size})>"


@final
class Layout:
    """A C struct: its fields, offsets and size, and how to (un)pack it.

    Fields are ``(name, ctype)`` or ``(name, ctype, count)`` for arrays of
    ``__u8`` (which pack as ``bytes``).
    """

    __slots__ = ("_struct", "cname", "fields", "size")

    def __init__(
        self, cname: str, *fields: tuple[str, str] | tuple[str, str, int]
    ) -> None:
        self.cname = cname
        offset = 0
        align_max = 1
        fmt = ["="]
        infos: list[FieldInfo] = []
        for field in fields:
            name, ctype = field[0], field[1]
            count = field[2] if len(field) == 3 else 1
            code, size, align = _CTYPES[ctype]
            pad = -offset % align
            if pad:
                fmt.append(f"{pad}x")
                offset += pad
            if count != 1:
                if ctype != "__u8":
                    raise TypeError("only __u8 arrays are supported")
                fmt.append(f"{count}s")
            else:
                fmt.append(code)
            infos.append(FieldInfo(name, ctype, offset, size * count))
            offset += size * count
            align_max = max(align_max, align)
        tail = -offset % align_max
        if tail:
            fmt.append(f"{tail}x")
        self._struct = struct.Struct("".join(fmt))
        self.fields: tuple[FieldInfo, ...] = tuple(infos)
        self.size: int = self._struct.size

    def offset(self, name: str) -> int:
        """The byte offset of field *name*."""
        for info in self.fields:
            if info.name == name:
                return info.offset
        raise KeyError(f"{self.cname} has no field {name!r}")

    def pack(self, **values: int | bytes) -> bytearray:
        """A buffer holding the struct; missing fields are zero.

        A ``size`` field, when present and not given, is set to the struct size.
        """
        args: list[int | bytes] = []
        for info in self.fields:
            if info.name in values:
                args.append(values.pop(info.name))
            elif info.name == "size":
                args.append(self.size)
            else:
                args.append(b"" if info.ctype == "__u8" and info.size > 1 else 0)
        if values:
            raise TypeError(f"{self.cname} has no field(s) {sorted(values)}")
        return bytearray(self._struct.pack(*args))

    def unpack(self, buf: bytes | bytearray | memoryview) -> dict[str, int | bytes]:
        """The fields of the struct at the start of *buf*."""
        values = self._struct.unpack_from(buf)
        return {
            info.name: value for info, value in zip(self.fields, values, strict=True)
        }

    def __repr__(self) -> str:
        return f"<Layout {self.cname} size={self.size}>"


# --- merged ABI ---------------------------------------------------------------

SESSION_CREATE = Layout(
    "liveupdate_ioctl_create_session",
    ("size", "__u32"),
    ("fd", "__s32"),
    ("name", "__u8", SESSION_NAME_LENGTH),
)
SESSION_RETRIEVE = Layout(
    "liveupdate_ioctl_retrieve_session",
    ("size", "__u32"),
    ("fd", "__s32"),
    ("name", "__u8", SESSION_NAME_LENGTH),
)
SESSION_PRESERVE_FD = Layout(
    "liveupdate_session_preserve_fd",
    ("size", "__u32"),
    ("fd", "__s32"),
    ("token", "__aligned_u64"),
)
SESSION_RETRIEVE_FD = Layout(
    "liveupdate_session_retrieve_fd",
    ("size", "__u32"),
    ("fd", "__s32"),
    ("token", "__aligned_u64"),
)
SESSION_FINISH = Layout(
    "liveupdate_session_finish",
    ("size", "__u32"),
    ("reserved", "__u32"),
)
SESSION_GET_NAME = Layout(
    "liveupdate_session_get_name",
    ("size", "__u32"),
    ("reserved", "__u32"),
    ("name", "__u8", SESSION_NAME_LENGTH),
)


@final
class Request:
    """One ioctl: its name, number and argument layout (``None``: no argument)."""

    __slots__ = ("layout", "name", "number")

    def __init__(self, name: str, number: int, layout: Layout | None) -> None:
        self.name = name
        self.number = number
        self.layout = layout

    def __repr__(self) -> str:
        return f"<Request {self.name} {self.number:#x}>"


class MergedNr:
    """Command numbers of the merged uapi header (plain ints: no ``enum``
    import on the restore path)."""

    CREATE_SESSION = 0x00
    RETRIEVE_SESSION = 0x01
    SESSION_PRESERVE_FD = 0x40
    SESSION_RETRIEVE_FD = 0x41
    SESSION_FINISH = 0x42
    SESSION_GET_NAME = 0x43


def _merged(name: str, layout: Layout) -> Request:
    nr: int = getattr(MergedNr, name)
    return Request(name, io(LIVEUPDATE_IOCTL_TYPE, nr), layout)


CREATE_SESSION: Final = _merged("CREATE_SESSION", SESSION_CREATE)
RETRIEVE_SESSION: Final = _merged("RETRIEVE_SESSION", SESSION_RETRIEVE)
PRESERVE_FD: Final = _merged("SESSION_PRESERVE_FD", SESSION_PRESERVE_FD)
RETRIEVE_FD: Final = _merged("SESSION_RETRIEVE_FD", SESSION_RETRIEVE_FD)
FINISH: Final = _merged("SESSION_FINISH", SESSION_FINISH)
GET_NAME: Final = _merged("SESSION_GET_NAME", SESSION_GET_NAME)

MERGED_REQUESTS: Final = (
    CREATE_SESSION,
    RETRIEVE_SESSION,
    PRESERVE_FD,
    RETRIEVE_FD,
    FINISH,
    GET_NAME,
)

# --- RFC ABI --------------------------------------------------------------------

RFC_FD = Layout(
    "liveupdate_fd",
    ("fd", "int"),
    ("flags", "__u32"),
    ("token", "__aligned_u64"),
)
RFC_TOKEN = Layout("__u64", ("token", "__u64"))
RFC_STATE = Layout("liveupdate_state", ("state", "__u32"))


RFC_FD_PRESERVE: Final = Request(
    "FD_PRESERVE", iow(LIVEUPDATE_IOCTL_TYPE, 0x00, RFC_FD.size), RFC_FD
)
RFC_FD_UNPRESERVE: Final = Request(
    "FD_UNPRESERVE", iow(LIVEUPDATE_IOCTL_TYPE, 0x01, RFC_TOKEN.size), RFC_TOKEN
)
RFC_FD_RESTORE: Final = Request(
    "FD_RESTORE", iowr(LIVEUPDATE_IOCTL_TYPE, 0x02, RFC_FD.size), RFC_FD
)
RFC_GET_STATE: Final = Request(
    "GET_STATE", ior(LIVEUPDATE_IOCTL_TYPE, 0x03, RFC_STATE.size), RFC_STATE
)
RFC_PREPARE: Final = Request("PREPARE", io(LIVEUPDATE_IOCTL_TYPE, 0x04), None)
RFC_CANCEL: Final = Request("CANCEL", io(LIVEUPDATE_IOCTL_TYPE, 0x06), None)
RFC_FINISH: Final = Request("FINISH", io(LIVEUPDATE_IOCTL_TYPE, 0x07), None)

RFC_REQUESTS: Final = (
    RFC_FD_PRESERVE,
    RFC_FD_UNPRESERVE,
    RFC_FD_RESTORE,
    RFC_GET_STATE,
    RFC_PREPARE,
    RFC_CANCEL,
    RFC_FINISH,
)


def encode_name(name: str) -> bytes:
    """The bytes of a session name; validation is the caller's (see _session)."""
    return name.encode("utf-8")


def decode_name(raw: bytes) -> str:
    """A NUL-terminated name from the kernel."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")
