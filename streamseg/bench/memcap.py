"""Run a command under a memory limit smaller than the data: cgroup v2, cgroup v1, systemd-run.

Used by ``streamseg bench --memory-cap``; the report always says whether the cap was applied
and, if not, why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_capped", "cgroup_v2_prepare", "cgroup_v1_prepare"]


def _read(path: str | Path, default: str = "") -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return default


def _cgroup2_mount() -> Path | None:
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


def _own_cgroup2() -> str | None:
    return next((ln[3:] for ln in _read("/proc/self/cgroup").splitlines() if ln.startswith("0::")), None)


def cgroup_v2_prepare(limit: int, *, mount: Path | None = None, own: str | None = None) -> tuple[Path | None, str]:
    """Create a child cgroup (v2) of this process's cgroup with ``memory.max = limit``.

    Returns ``(path, "")`` on success, or ``(None, reason)`` saying why it cannot be done here.
    """
    mount = mount or _cgroup2_mount()
    own = own if own is not None else _own_cgroup2()
    if mount is None or own is None:
        return None, "no cgroup v2 hierarchy is mounted"
    base = mount / own.lstrip("/")
    controllers = _read(base / "cgroup.controllers").split()
    if "memory" not in controllers:
        return None, (f"the cgroup v2 hierarchy at {mount} offers no memory controller "
                      f"(controllers: {' '.join(controllers) or 'none'})")
    control = base / "cgroup.subtree_control"
    try:
        if "memory" not in control.read_text().split():
            control.write_text("+memory")
    except OSError as exc:
        return None, f"cannot enable the memory controller below {base} ({exc.strerror or exc})"
    child = base / f"streamseg-bench-{os.getpid()}"
    try:
        child.mkdir(exist_ok=True)
        (child / "memory.max").write_text(str(limit))
    except OSError as exc:
        _rmdir(child)
        return None, f"cannot create a limited cgroup at {child} ({exc.strerror or exc})"
    with contextlib.suppress(OSError):  # without swap accounting the cap still holds for RAM
        (child / "memory.swap.max").write_text("0")
    return child, ""


def cgroup_v1_prepare(limit: int, *, base: Path = Path("/sys/fs/cgroup/memory")) -> tuple[Path | None, str]:
    """Create a cgroup v1 memory group with ``memory.limit_in_bytes = limit`` (needs root)."""
    if not (base / "memory.limit_in_bytes").exists():
        return None, f"no cgroup v1 memory hierarchy at {base}"
    child = base / f"streamseg-bench-{os.getpid()}"
    try:
        child.mkdir(exist_ok=True)
        (child / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # swap accounting may be off: the cap still holds for RAM
            (child / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError as exc:
        _rmdir(child)
        return None, f"cannot create a limited cgroup at {child} ({exc.strerror or exc})"
    return child, ""


def _rmdir(path: Path) -> None:
    for _ in range(20):  # workers may take a moment to leave the cgroup
        try:
            return path.rmdir()
        except FileNotFoundError:
            return None
        except OSError:
            time.sleep(0.1)
    return None


def run_capped(make_argv: Callable[[str], list[str]], requested: str, limit: int
               ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run ``make_argv(json_path)`` in a child under ``limit`` bytes of memory.

    Tries a cgroup v2 child group, then a cgroup v1 memory group, then ``systemd-run``.

    Returns
    -------
    result, cap : dict or None, dict
        The child's JSON result (None if it failed or no cap could be applied) and a report:
        ``applied``, ``how``, ``why_not``, ``outcome``.
    """
    cap: dict[str, Any] = {"requested": requested, "requested_bytes": limit, "applied": False,
                           "how": None, "why_not": None}
    reasons = []
    with tempfile.TemporaryDirectory(prefix="streamseg-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        argv, env = make_argv(out), {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        group, why = cgroup_v2_prepare(limit)
        version = "v2"
        if group is None:
            reasons.append(f"cgroup v2: {why}")
            group, why = cgroup_v1_prepare(limit)
            version = "v1"
            if group is None:
                reasons.append(f"cgroup v1: {why}")
        if group is not None:
            enter = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs")]
            try:  # the shell joins the cgroup, then becomes the measurement (no preexec_fn with threads)
                proc = subprocess.run(enter + argv, env=env, capture_output=True, text=True)
                events = _read(group / "memory.events")
                if version == "v1":
                    events = _read(group / "memory.oom_control")
                cap.update(applied=True, how=f"cgroup {version} {group} memory limit {limit} bytes")
                cap["oom_kills"] = next((int(line.split()[1]) for line in events.splitlines()
                                         if line.startswith("oom_kill ")), 0)
            finally:
                _rmdir(group)
        else:
            if Path("/run/systemd/system").is_dir() and shutil.which("systemd-run"):
                scope = ["systemd-run", "--scope", "--quiet", "--collect", "-p", f"MemoryMax={limit}",
                         "-p", "MemorySwapMax=0"] + ([] if os.geteuid() == 0 else ["--user"])
                proc = subprocess.run(scope + ["--"] + argv, env=env, capture_output=True, text=True)
                refused = [ln for ln in proc.stderr.splitlines()
                           if ln.startswith(("Failed to", "System has not been booted"))]
                started = os.path.exists(out) or not refused
                if started:
                    cap.update(applied=True, how=f"systemd-run --scope -p MemoryMax={limit}")
                else:
                    reasons.append(f"systemd-run: {refused[-1]}")
            else:
                reasons.append("systemd-run: systemd is not the init system here "
                               f"(PID 1 is {_read('/proc/1/comm', '?').strip()!r}), so no scope can be created")
        if not cap["applied"]:
            cap["why_not"] = "; ".join(reasons)
            return None, cap
        cap["exit_status"] = proc.returncode
        if proc.returncode != 0 or not os.path.exists(out):
            killed = proc.returncode in (-9, 137) or cap.get("oom_kills")
            cap["outcome"] = ("killed: out of memory under the cap" if killed
                              else f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            return None, cap
        cap["outcome"] = "completed under the cap"
        return json.loads(Path(out).read_text()), cap
