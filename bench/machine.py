"""What a benchmark ran on (the machine, the package versions, the exact qprep sources) and how busy
others kept it meanwhile."""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
QUIET = {"max_wait_s": 0.0, "waited_s": 0.0}  # --quiet-wait, and how long the waits took


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


def system_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat, idle and iowait excluded)."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(idle_cores: float = 0.3, seconds: int = 3) -> None:
    """Wait (at most --quiet-wait s) until other work keeps less than `idle_cores` busy for
    `seconds` in a row, so that a measurement does not share the cores with, say, a test run."""
    deadline, calm = time.monotonic() + QUIET["max_wait_s"], 0
    began = time.monotonic()
    while calm < seconds and time.monotonic() < deadline:
        busy = system_busy_s()
        time.sleep(1.0)
        calm = calm + 1 if system_busy_s() - busy < idle_cores else 0
    QUIET["waited_s"] += time.monotonic() - began
