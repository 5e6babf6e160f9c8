"""What every benchmark result file ends with: the table it printed, then the CPU it ran on."""

from __future__ import annotations

import subprocess
from pathlib import Path


def cpu_flags() -> str:
    """`lscpu`'s model name, CPU count and flags (the speed and kernel choices depend on them)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    keep = ("Model name", "CPU(s)", "Flags")
    return "\n".join(line for line in out.splitlines() if line.split(":")[0].strip() in keep)


def finish(lines: list[str], out: Path) -> None:
    """Print the result lines with the CPU flags and write them to `out`."""
    text = "\n".join([*lines, "", cpu_flags()]) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
