"""Request numbers and struct layouts of both ABIs, against the reference doc."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.luo import _abi
from orchestrator.luo._ioc import (
    io,
    ioc_dir,
    ioc_nr,
    ioc_size,
    ioc_type,
    ior,
    iow,
    iowr,
)
from orchestrator.luo._rfcstate import RfcState

# From shared/reference/luo-uapi.md, typed in by hand on purpose.
MERGED_NUMBERS = {
    "CREATE_SESSION": 0xBA00,
    "RETRIEVE_SESSION": 0xBA01,
    "SESSION_PRESERVE_FD": 0xBA40,
    "SESSION_RETRIEVE_FD": 0xBA41,
    "SESSION_FINISH": 0xBA42,
    "SESSION_GET_NAME": 0xBA43,
}
RFC_NUMBERS = {
    "FD_PRESERVE": 0x4010BA00,
    "FD_UNPRESERVE": 0x4008BA01,
    "FD_RESTORE": 0xC010BA02,
    "GET_STATE": 0x8004BA03,
    "PREPARE": 0xBA04,
    "CANCEL": 0xBA06,
    "FINISH": 0xBA07,
}
# layout -> (size, {field: offset})
LAYOUTS = {
    "create": (_abi.SESSION_CREATE, 72, {"size": 0, "fd": 4, "name": 8}),
    "retrieve": (_abi.SESSION_RETRIEVE, 72, {"size": 0, "fd": 4, "name": 8}),
    "preserve_fd": (_abi.SESSION_PRESERVE_FD, 16, {"size": 0, "fd": 4, "token": 8}),
    "retrieve_fd": (_abi.SESSION_RETRIEVE_FD, 16, {"size": 0, "fd": 4, "token": 8}),
    "finish": (_abi.SESSION_FINISH, 8, {"size": 0, "reserved": 4}),
    "get_name": (_abi.SESSION_GET_NAME, 72, {"size": 0, "reserved": 4, "name": 8}),
    "rfc_fd": (_abi.RFC_FD, 16, {"fd": 0, "flags": 4, "token": 8}),
    "rfc_token": (_abi.RFC_TOKEN, 8, {"token": 0}),
    "rfc_state": (_abi.RFC_STATE, 4, {"state": 0}),
}


@pytest.mark.parametrize(("name", "number"), MERGED_NUMBERS.items())
def test_merged_request_numbers(name: str, number: int) -> None:
    (request,) = [r for r in _abi.MERGED_REQUESTS if r.name == name]
    assert request.number == number


@pytest.mark.parametrize(("name", "number"), RFC_NUMBERS.items())
def test_rfc_request_numbers(name: str, number: int) -> None:
    (request,) = [r for r in _abi.RFC_REQUESTS if r.name == name]
    assert request.number == number


@pytest.mark.parametrize("key", LAYOUTS)
def test_struct_sizes_and_offsets(key: str) -> None:
    layout, size, offsets = LAYOUTS[key]
    assert layout.size == size
    assert {f.name: f.offset for f in layout.fields} == offsets


def test_rfc_states() -> None:
    assert [(s.name, int(s)) for s in RfcState] == [
        ("UNDEFINED", 0),
        ("NORMAL", 1),
        ("PREPARED", 2),
        ("FROZEN", 3),
        ("UPDATED", 4),
    ]


def test_ioc_encoders_match_the_kernel_macros() -> None:
    assert io(0xBA, 0x04) == 0xBA04
    assert iow(0xBA, 0x00, 16) == 0x4010BA00
    assert ior(0xBA, 0x03, 4) == 0x8004BA03
    assert iowr(0xBA, 0x02, 16) == 0xC010BA02
    with pytest.raises(ValueError, match="size"):
        iow(0xBA, 0, 1 << 14)


@given(
    direction=st.integers(0, 3),
    type_=st.integers(0, 255),
    nr=st.integers(0, 255),
    size=st.integers(0, (1 << 14) - 1),
)
def test_ioc_round_trip(direction: int, type_: int, nr: int, size: int) -> None:
    from orchestrator.luo._ioc import ioc

    request = ioc(direction, type_, nr, size)
    assert (
        ioc_dir(request),
        ioc_type(request),
        ioc_nr(request),
        ioc_size(request),
    ) == (
        direction,
        type_,
        nr,
        size,
    )


u32 = st.integers(0, (1 << 32) - 1)
s32 = st.integers(-(1 << 31), (1 << 31) - 1)
u64 = st.integers(0, (1 << 64) - 1)
name = st.binary(min_size=0, max_size=_abi.SESSION_NAME_LENGTH)


@given(size=u32, fd=s32, raw=name)
def test_session_struct_round_trip(size: int, fd: int, raw: bytes) -> None:
    for layout in (_abi.SESSION_CREATE, _abi.SESSION_RETRIEVE):
        buf = layout.pack(size=size, fd=fd, name=raw)
        assert len(buf) == layout.size
        assert layout.unpack(buf) == {
            "size": size,
            "fd": fd,
            "name": raw.ljust(_abi.SESSION_NAME_LENGTH, b"\0"),
        }
        assert int.from_bytes(buf[4:8], "little", signed=True) == fd


@given(fd=s32, token=u64)
def test_fd_struct_round_trip(fd: int, token: int) -> None:
    for layout in (_abi.SESSION_PRESERVE_FD, _abi.SESSION_RETRIEVE_FD):
        buf = layout.pack(fd=fd, token=token)
        assert layout.unpack(buf) == {"size": 16, "fd": fd, "token": token}
        assert int.from_bytes(buf[8:16], "little") == token
    buf = _abi.RFC_FD.pack(fd=fd, token=token)
    assert _abi.RFC_FD.unpack(buf) == {"fd": fd, "flags": 0, "token": token}


@given(reserved=u32)
def test_finish_struct_round_trip(reserved: int) -> None:
    buf = _abi.SESSION_FINISH.pack(reserved=reserved)
    assert _abi.SESSION_FINISH.unpack(buf) == {"size": 8, "reserved": reserved}


def test_pack_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError, match="no field"):
        _abi.SESSION_FINISH.pack(bogus=1)
