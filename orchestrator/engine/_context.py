"""What a plugin's hook receives: the step, its options, and the run around it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, final

import anyio.to_thread

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.luo import Kernel, OwnedFd
    from orchestrator.restore._journal import Journal

    from ._playbook import Playbook, Step
    from ._preserve import Preserver, Retriever


@dataclass(slots=True)
class RunContext:
    """State of one update run, shared by its steps (the engine owns it)."""

    run_id: str
    playbook: Playbook
    kernel: Kernel
    journal: Journal
    state_dir: Path
    preserver: Preserver | None = None
    retriever: Retriever | None = None
    # plugin -> key -> value: what plugins recorded; journaled at each step end.
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    # plugin -> key -> manifest entry (session/token): where each fd went.
    manifest: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


@final
@dataclass(frozen=True, slots=True)
class StepContext:
    """Passed to every hook as ``ctx``.

    :ivar step: the playbook step being run.
    :ivar attempt: 1 for the first try, 2 for the first retry, ...
    """

    step: Step
    run: RunContext
    attempt: int

    @property
    def options(self) -> dict[str, Any]:
        """The step's ``with:`` mapping."""
        return dict(self.step.options)

    @property
    def kernel(self) -> Kernel:
        return self.run.kernel

    @property
    def state_dir(self) -> Path:
        return self.run.state_dir

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"liveupdate.plugin.{self.step.plugin}")

    def record(self, key: str, value: Any) -> None:
        """Remember *value* (JSON-able) for this plugin's later hooks -- also after
        the kexec and after a crash: it is journaled when the step ends."""
        self.run.records.setdefault(self.step.plugin, {})[key] = value

    def recorded(self, key: str, default: Any = None) -> Any:
        return self.run.records.get(self.step.plugin, {}).get(key, default)

    async def preserve(self, key: str, fd: int, *, session: str | None = None) -> None:
        """Preserve *fd* across the kexec under *key* (unique for this plugin).

        :param session: keep it with the other files of this group in a
            session of their own (one per VM, say) rather than in the
            plugin's; the kernel limits a session name to 63 bytes.
        :raises UnsupportedFileError: this kernel cannot preserve that kind of file.
        :raises InvalidArgumentError: the session name is too long.
        """
        preserver = self.run.preserver
        if preserver is None:
            raise RuntimeError("fds can only be preserved in the preserve phase")
        entry = await anyio.to_thread.run_sync(
            preserver.preserve, self.step.plugin, key, fd, session
        )
        self.run.manifest.setdefault(self.step.plugin, {})[key] = entry

    def preserved(self, key: str) -> dict[str, Any]:
        """Where the fd preserved under *key* went (its manifest entry)."""
        entry = self.run.manifest.get(self.step.plugin, {}).get(key)
        if entry is None:
            raise KeyError(
                f"plugin {self.step.plugin!r} preserved nothing under {key!r}"
            )
        return dict(entry)

    def preserved_keys(self) -> list[str]:
        return sorted(self.run.manifest.get(self.step.plugin, {}))

    async def retrieve(self, key: str) -> OwnedFd:
        """In the new kernel: the fd preserved under *key*, owned by the caller."""
        retriever = self.run.retriever
        entry = self.run.manifest.get(self.step.plugin, {}).get(key)
        if retriever is None or entry is None:
            raise KeyError(
                f"plugin {self.step.plugin!r} preserved nothing under {key!r}"
            )
        return await anyio.to_thread.run_sync(retriever.retrieve, entry)
