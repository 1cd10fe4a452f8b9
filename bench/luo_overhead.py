"""PRESERVE and RETRIEVE of 1 GiB: the project's layers against the raw ioctl.

    python -m bench.luo_overhead [--mib 1024] [--runs 5]

Boots the LUO test kernel in QEMU (the VM harness of ``make e2e``; the kernel
is built or taken from the cache) and, in the guest:

- before the kexec, *runs* times in turns: PRESERVE_FD of a memfd of MIB MiB
  with a bare ``fcntl.ioctl`` (``tests.vm.floor``, the floor client's code),
  then with the kernel layer (``orchestrator.luo``: ``Session.preserve_fd``),
  each in a fresh session that is closed again (which drops it);
- then preserves two such memfds, one in a session of each kind, and kexecs;
- after it: RETRIEVE_FD of the first with the bare ioctl; of the second,
  through the keeper as ``liveupdate resume`` does it (the keeper's
  RETRIEVE_FD, then the fd handed over a Unix socket), and the kernel
  layer's own ``Session.retrieve_fd`` of nothing more is the keeper's inner
  call. One kexec gives one RETRIEVE sample of each.

Prints a table and writes ``bench-luo-overhead.json`` into the run's out dir.
Only the ioctl calls are timed (``time.perf_counter`` around them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import NoReturn

RAW_SESSION = b"bench-raw"
LIB_SESSION = "bench-lib"
TOKEN = 1


def _memfd(mib: int) -> int:
    fd = os.memfd_create("bench", 0)
    chunk = b"\xa5" * (1 << 20)
    for _ in range(mib):
        os.write(fd, chunk)
    return fd


def guest_pre(mib: int, runs: int) -> NoReturn:
    from orchestrator.luo import LiveUpdateDevice, Session
    from tests.vm import floor, guest, kexec

    fd = _memfd(mib)
    raw_s, lib_s = [], []

    def raw_session(name: bytes) -> int:
        dev = os.open(floor.DEV, os.O_RDWR)  # single opener: never both at once
        try:
            return floor.create_session(dev, name)
        finally:
            os.close(dev)

    def lib_session(name: str) -> Session:
        with LiveUpdateDevice.open("real") as dev:
            return dev.create_session(name)

    for i in range(runs):
        session = raw_session(b"bench-raw-%d" % i)
        t0 = time.perf_counter()
        floor.preserve_fd(session, fd, TOKEN)
        raw_s.append(time.perf_counter() - t0)
        os.close(session)  # drops it, and un-preserves the memfd
        with lib_session(f"bench-lib-{i}") as s:
            t0 = time.perf_counter()
            s.preserve_fd(fd, TOKEN)
            lib_s.append(time.perf_counter() - t0)
    os.close(fd)  # three at once would not fit: the guest has room for two
    raw_fd, lib_fd = _memfd(mib), _memfd(mib)
    floor.preserve_fd(raw_session(RAW_SESSION), raw_fd, TOKEN)
    kept = lib_session(LIB_SESSION)  # held (not collected) until the kexec
    kept.preserve_fd(lib_fd, TOKEN)
    guest.write_json(
        guest.out_dir() / "bench-pre.json",
        {"mib": mib, "preserve_raw_s": raw_s, "preserve_lib_s": lib_s},
    )
    kexec.kexec_file_load(
        os.environ["LUO_VM_KERNEL"], os.environ["LUO_VM_NEXT_CMDLINE"]
    )
    kexec.reboot_kexec()


def guest_post() -> int:
    from orchestrator.luo._kernel import kernel_from_spec
    from orchestrator.restore._keeper import Keeper
    from tests.vm import floor, guest

    out = guest.out_dir()
    dev = os.open(floor.DEV, os.O_RDWR)
    session = floor.retrieve_session(dev, RAW_SESSION)
    t0 = time.perf_counter()
    raw_fd = floor.retrieve_fd(session, TOKEN)
    raw = time.perf_counter() - t0
    os.close(dev)  # the device is single-opener: the keeper opens it next
    state = out / "bench-keeper"
    state.mkdir(exist_ok=True)
    kernel = kernel_from_spec("real")
    keeper = Keeper.ensure(kernel, state, "bench", "merged", [LIB_SESSION])
    t0 = time.perf_counter()
    lib = keeper.retrieve({"session": LIB_SESSION, "token": TOKEN})
    through_keeper = time.perf_counter() - t0
    sizes = [os.fstat(raw_fd).st_size, os.fstat(lib.fileno()).st_size]
    floor.session_finish(session)
    keeper.finish()
    pre = json.loads((out / "bench-pre.json").read_text())
    guest.write_json(
        out / "bench-luo-overhead.json",
        {
            **pre,
            "retrieve_raw_s": raw,
            "retrieve_keeper_s": through_keeper,
            "sizes": sizes,
        },
    )
    return 0


def _row(label: str, raw: list[float], lib: list[float]) -> str:
    r, o = statistics.median(raw), statistics.median(lib)
    return (
        f"  {label:34} {r * 1e3:10.3f} {o * 1e3:10.3f} {(o - r) * 1e3:+9.3f} "
        f"{(o - r) / r * 100:+7.2f}%"
    )


def _floats(values: object) -> list[float]:
    assert isinstance(values, list)
    return [float(v) for v in values]


def main(argv: list[str]) -> int:
    if argv[:1] == ["guest"]:
        if argv[1] == "pre":
            return guest_pre(int(argv[2]), int(argv[3]))
        return guest_post()
    p = argparse.ArgumentParser(
        prog="python -m bench.luo_overhead", description=__doc__
    )
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    from tests.vm.harness import Scenario, python_argv, run_scenario
    from tests.vm.kernel import ensure_kernel

    sc = Scenario.pre_post(
        "bench-luo-overhead",
        pre=python_argv(
            "-m", "bench.luo_overhead", "guest", "pre", str(args.mib), str(args.runs)
        ),
        post=python_argv("-m", "bench.luo_overhead", "guest", "post"),
        memory="5G",
        timeout=1800,
    )
    result = run_scenario(sc, ensure_kernel(), echo=False)
    data = result.read_json("bench-luo-overhead.json")
    if data is None:
        print("no result:", *result.failures(), sep="\n  ")
        return 1
    want = args.mib << 20
    print(f"{args.mib} MiB memfd, real LUO kernel in QEMU (TCG); ms, median")
    print(f"  {'':34} {'raw ioctl':>10} {'project':>10} {'diff':>9} {'diff %':>8}")
    print(
        _row(
            f"PRESERVE_FD ({args.runs} each)",
            _floats(data["preserve_raw_s"]),
            _floats(data["preserve_lib_s"]),
        )
    )
    print(
        _row(
            "RETRIEVE_FD (1 each; keeper path)",
            _floats([data["retrieve_raw_s"]]),
            _floats([data["retrieve_keeper_s"]]),
        )
    )
    ok = data["sizes"] == [want, want]
    print(f"  sizes after the kexec: {data['sizes']} ({'ok' if ok else 'WRONG'})")
    print(f"  out dir: {result.out_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
