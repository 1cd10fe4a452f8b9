"""``python -m bench``: every benchmark, one after the other."""

from __future__ import annotations

import subprocess
import sys

for module in ("bench.engine_steps", "bench.resume_cold_start"):
    print(f"== {module}", flush=True)
    subprocess.run([sys.executable, "-m", module], check=True)
