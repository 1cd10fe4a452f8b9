"""``python -m bench``: every benchmark, one after the other.

The last ones boot the LUO test kernel in QEMU (built on first use, then
cached; see ``docs/vm-harness.md``): ``--no-vm`` skips them.
"""

from __future__ import annotations

import subprocess
import sys

MODULES = ["bench.engine_steps", "bench.resume_cold_start"]
if "--no-vm" not in sys.argv[1:]:
    MODULES += ["bench.luo_overhead", "bench.scale"]
for module in MODULES:
    print(f"== {module}", flush=True)
    subprocess.run([sys.executable, "-m", module], check=True)
