"""What a benchmark ran on: the machine, the package versions, and the exact qprep sources."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def environment(workdir: Path, packages: tuple[str, ...]) -> dict:
    facts = {"cores": os.cpu_count(), "cpu": cpu_model(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE")
             * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "python": platform.python_version()}
    for name in packages:
        try:
            facts[name] = version(name)
        except Exception:
            facts[name] = None
    facts["qprep sources"] = source_state()
    facts["workdir"] = str(workdir)
    return facts


def source_state() -> str:
    """The git commit plus a digest of qprep/*.py as they are now (uncommitted edits included)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "qprep").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return f"{commit} + working tree {digest.hexdigest()[:12]}"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()
