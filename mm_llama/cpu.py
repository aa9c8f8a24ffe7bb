"""What this machine's CPU can do for bf16: figures (speed, and the last digits of trained weights) move between
the kernel paths torch takes on an Intel CPU with AMX, on one with AVX-512 bf16 only, and on one without bf16 units
(emulated through fp32, ~45x slower). One reader of /proc/cpuinfo for the demo's report and precision choice and
for the benchmarks."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_info() -> str:
    """/proc/cpuinfo ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    return next(
        (ln.split(":", 1)[1].strip() for ln in cpu_info().splitlines() if ln.startswith("model name")), "unknown CPU"
    )


def cpu_bf16_units() -> list[str]:
    """The bf16 instruction sets this CPU announces, of amx_bf16 and avx512_bf16 (a hypervisor may hide AMX)."""
    words = set(cpu_info().split())
    return [f for f in ("amx_bf16", "avx512_bf16") if f in words]


def cpu_has_bf16() -> bool:
    return bool(cpu_bf16_units())


def cpu_kernel_path() -> str:
    """The CPU model and the bf16 path its kernels take, e.g. "AMD EPYC, bf16 via AVX-512"."""
    units = cpu_bf16_units()
    path = "bf16 via AMX" if "amx_bf16" in units else "bf16 via AVX-512" if units else "fp32 fallback (no bf16 units)"
    return f"{cpu_name()}, {path}"
