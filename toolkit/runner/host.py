"""This machine's CPU, memory and OS as runtimes see them: which kernels they pick (and so their
figures, speed or crashes) depends on it. Standard library only; shipped in every bundle."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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


# --- runtime options chosen for this CPU ----------------------------------------------------

AUTO = "auto"


def one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    """value is one of `allowed`, of the same type too (True is not 1, "0" is not 0)."""
    return any(value == a and type(value) is type(a) for a in allowed)


@dataclass(frozen=True)
class HostRule:
    """One row of a runtime's host table: on a CPU of one of `classes` (any, when empty) with
    every flag in `features` and none in `absent`, `option` takes `value` (None: the runtime's
    own default). A row that `protects` avoids a crash or wrong results: `run.py tune` does not
    try the option's other values where it applies."""
    option: str
    value: Any
    why: str
    classes: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    protects: bool = False

    def applies(self, cpu: dict[str, Any]) -> bool:
        flags = set(cpu.get("flags", ()))
        return (not self.classes or cpu.get("class") in self.classes) \
            and all(f in flags for f in self.features) and not flags & set(self.absent)


@dataclass(frozen=True)
class HostTable:
    """The runtime options whose best value depends on the CPU: the values each may take (what a
    bundle, the caller or tuned.json may set, and what `run.py tune` tries) and the rows that
    decide an option left at "auto" (the first row that applies wins). runtime_defaults: what
    the runtime does with an option left unset, where that is one value on every CPU (ONNX
    Runtime spins): the report then names the value in force, not just "runtime default", and
    a run with that value set is seen to be the same configuration."""
    choices: dict[str, tuple[Any, ...]]
    rows: tuple[HostRule, ...] = ()
    runtime_defaults: dict[str, Any] = field(default_factory=dict)

    def tunable(self, cpu: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
        """The options `run.py tune` may try on this CPU, with their values: all but those a
        protecting row pins here."""
        pinned = {r.option for r in self.rows if r.protects and r.applies(cpu)}
        return {k: v for k, v in self.choices.items() if k not in pinned}

    def checked(self, options: Any, max_threads: int) -> dict[str, Any]:
        """The options a device's tuned.json may set: `threads` in range and this table's
        options with allowed values; anything else is refused (a device writes the file, it
        is not hashed)."""
        names = ["threads", *self.choices]
        if not isinstance(options, dict) or set(options) - set(names):
            raise ValueError(f"only {', '.join(map(repr, names))} may be tuned, got "
                             f"{sorted(options) if isinstance(options, dict) else options!r}")
        threads = options.get("threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                    or not 1 <= threads <= max_threads):
            raise ValueError(f"threads must be an integer from 1 to {max_threads}")
        for name, value in options.items():
            if name != "threads" and not one_of(value, self.choices[name]):
                raise ValueError(f"{name} must be one of "
                                 f"{', '.join(map(repr, self.choices[name]))}")
        return dict(options)

    def choose(self, options: dict[str, Any], cpu: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """(options with every table option that is absent or "auto" decided for this CPU,
        what is in force: option -> {"value", "why"}, for info() and so the parity report).
        A value outside the option's choices is refused: bundles and tuned.json are input."""
        cpu = cpu or host_cpu()
        resolved, in_force = dict(options), {}
        for option, allowed in self.choices.items():
            given = options.get(option, AUTO)
            if given is not None and given != AUTO:
                if not one_of(given, allowed):
                    raise ValueError(f"runtime option {option}: {given!r} is not one of "
                                     f"{', '.join(map(repr, allowed))} or 'auto'")
                in_force[option] = {"value": given, "why": "set (bundle, tuned.json or caller)"}
                continue
            rule = next((r for r in self.rows if r.option == option and r.applies(cpu)), None)
            resolved[option] = rule.value if rule else None
            in_force[option] = {
                "value": resolved[option] if rule else
                self.runtime_defaults.get(option, "runtime default"),
                "why": f"auto on this {cpu.get('class')} CPU: {rule.why}" if rule else
                f"auto: no row for this {cpu.get('class')} CPU, so the runtime's own default"}
        return resolved, in_force


def describe_choices(table: HostTable, cpu: dict[str, Any]) -> list[str]:
    """One line per option of `table`: what "auto" decides on this CPU and why (phikit doctor)."""
    _, in_force = table.choose({}, cpu)
    return [f"{option} = {entry['value']} ({entry['why']})" for option, entry in in_force.items()]


def one_copy_at_a_time(option: Any, weights_bytes: int) -> bool:
    """Should a runtime that keeps a second copy of the model for teacher-forced logits
    (OpenVINO's plain infer request beside LLMPipeline, ONNX's all-logits graph beside the
    generation graph) hold one copy at a time, loading the other when the call changes? An
    option other than "auto" decides; "auto": yes when two copies, each about 1.3x its weights,
    would take more than half the memory available now (Linux; elsewhere both are kept)."""
    if option not in (None, AUTO):
        return bool(option)
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        available = int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024
    except (OSError, ValueError, IndexError):
        return False
    return 2 * 1.3 * weights_bytes > available / 2
