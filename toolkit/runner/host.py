"""This machine's CPU and OS as runtimes see them: which kernels they pick (and so their figures,
speed or crashes) depends on it. Standard library only; shipped in every bundle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# CPU features that change which kernels a runtime picks (and so its numbers, speed or crashes):
# AMX (llama.cpp's AMX buffer type, PyTorch bf16), AVX512-FP16 (OpenVINO honours an f16 hint only
# with native fp16), VNNI (int8 dot products), AVX2 (the baseline of x86-64-v3); on ARM, fp16
# arithmetic, dot product, int8 matmul and SVE.
CPU_FEATURES_OF_NOTE = ("amx_int8", "amx_bf16", "amx_tile", "avx512_fp16", "avx512_bf16",
                        "avx512_vnni", "avx512f", "avx_vnni", "avx2", "fma", "f16c",
                        "asimd", "asimdhp", "fphp", "asimddp", "i8mm", "sve")


def host_cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """This machine's CPU as runtimes see it: model name, all flags, the flags of note, and a
    class ("amx", "avx512", "avx2", "x86-64", "arm64") for tables that choose runtime options."""
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    machine = platform.machine().lower()
    if "amx_int8" in flags or "amx_tile" in flags:
        cls = "amx"
    elif "avx512f" in flags:
        cls = "avx512"
    elif "avx2" in flags:
        cls = "avx2"
    elif machine in ("aarch64", "arm64"):
        cls = "arm64"
    else:
        cls = machine or "unknown"
    return {"model": model or platform.processor() or machine, "machine": machine,
            "class": cls, "flags": sorted(flags),
            "features": [f for f in CPU_FEATURES_OF_NOTE if f in flags],
            "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}"}


def available_cpus() -> int:
    """The CPUs this process may run on: a container's cpuset, `taskset`, a CI job's slice,
    not every core the machine has (threads beyond them only contend and spin)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on macOS
        return os.cpu_count() or 1


def host_summary(all_flags: bool = False) -> dict[str, Any]:
    """The machine that ran the parity engine (and, unless emulated, the candidate): what a
    figure needs to be traced to the hardware that produced it. all_flags: every CPU flag too
    (a device's report, read where that device is not)."""
    cpu = host_cpu()
    out = {"cpu": cpu["model"], "cpu_class": cpu["class"], "cpu_features": cpu["features"],
           "cores": cpu["cores"], "os": cpu["os"], "machine": cpu["machine"]}
    return {**out, "cpu_flags": cpu["flags"]} if all_flags else out
