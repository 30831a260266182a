"""Writes one benchmark's section of BENCHMARKS.md, replacing its previous version."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def write_section(name: str, command: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replaces (or appends) the section ``name`` with ``body``, stamped with the command, machine and date."""
    date = _dt.date.today().isoformat()
    section = (f"<!-- begin {name} -->\n## {name}\n\n`{command}` — {machine()}, {date}\n\n{body.strip()}\n"
               f"<!-- end {name} -->\n")
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here is written by a script in `benchmarks/`.\n\n"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
