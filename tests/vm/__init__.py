"""Real-kernel VM harness: a LUO test kernel booted in QEMU, kexec included."""

from __future__ import annotations
