"""Load the next kernel in PREPARE; unload it on CANCEL.

Options (``with:``, see :data:`OPTIONS`): ``image``, ``initrd``, ``cmdline``
-- default to the playbook's ``next_kernel``; without a ``cmdline`` the running
kernel's is used, as is (the engine never appends to it, so markers never
accumulate).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread

from orchestrator import Option, PlaybookError, hookimpl

if TYPE_CHECKING:
    from orchestrator import StepContext


OPTIONS = (
    Option("image", str, "the kernel image", default_doc="next_kernel.image"),
    Option("initrd", str, "the initramfs", default_doc="next_kernel.initrd"),
    Option(
        "cmdline",
        str,
        "the kernel command line",
        default_doc="next_kernel.cmdline, else the running kernel's",
    ),
)


class KexecPlugin:
    """Loads the next kernel in PREPARE; unloads it if the update is cancelled."""

    name = "kexec"
    options = OPTIONS

    @hookimpl
    async def lu_prepare(self, ctx: StepContext) -> None:
        opts = ctx.options
        nxt = ctx.run.playbook.next_kernel
        image = opts.get("image") or (nxt.image if nxt else None)
        if image is None:
            raise PlaybookError(
                str(ctx.run.playbook.path),
                ctx.step.where.line,
                "the kexec step needs an image: set next_kernel.image or with.image",
            )
        initrd = opts.get("initrd") or (nxt.initrd if nxt else None)
        cmdline = (
            opts.get("cmdline")
            or (nxt.cmdline if nxt else None)
            or ctx.kernel.cmdline()
        )
        await anyio.to_thread.run_sync(
            ctx.kernel.kexec_load,
            Path(image),
            Path(initrd) if initrd else None,
            cmdline,
        )
        ctx.record("loaded", {"image": str(image), "cmdline": cmdline})

    @hookimpl
    async def lu_prepare_rollback(self, ctx: StepContext) -> None:
        if await anyio.to_thread.run_sync(ctx.kernel.kexec_loaded):
            await anyio.to_thread.run_sync(ctx.kernel.kexec_unload)
