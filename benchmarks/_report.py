"""What every benchmark script ends with: a readable table, then its figures as one JSON line."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> str:
    """CPU model and core count, for the record beside each figure."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cpu, {platform.system()} {platform.release()}, python {platform.python_version()}"


def report(figures: dict[str, Any], digits: int = 3) -> None:
    """Print ``figures`` as a table, then as one JSON object on the last line (floats rounded)."""
    width = max(len(k) for k in figures) + 2
    for key, value in figures.items():
        print(f"{key:>{width}}: {value:,.{digits}f}" if isinstance(value, float) else f"{key:>{width}}: {value}")
    print(json.dumps({k: round(v, digits) if isinstance(v, float) else v for k, v in figures.items()}))
