"""Choose the training precision from what the hardware runs natively.

bf16 autocast on a CPU without native bf16 instructions (AVX2-only machines) is emulated and about 27x
slower than fp32, so "auto" picks ``bf16-mixed`` only where bf16 is native: a CUDA device that supports
it, or a CPU whose flags include ``avx512_bf16`` or ``amx_bf16``. Everything else trains in ``32-true``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layermoe.lightning_compat import lightning_precisions

NATIVE_BF16_CPU_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16"})
AUTO = "auto"


def precision_problem(precision: object) -> str | None:
    """The message for a ``trainer.precision`` that neither "auto" nor Lightning accepts, else None."""
    if precision is None or precision == AUTO or precision in lightning_precisions():
        return None
    common = ", ".join(v for v in lightning_precisions() if isinstance(v, str) and "-" in v)
    return (
        f"trainer.precision: {precision!r} is not a precision; use auto (bf16-mixed where bf16 is native,"
        f" else 32-true) or one of {common}"
    )


def cpu_flags(cpuinfo_text: str | None = None) -> set[str]:
    """The CPU feature flags listed in ``/proc/cpuinfo`` (empty when it cannot be read, e.g. macOS)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_native_bf16(cpuinfo_text: str | None = None) -> bool:
    """Whether the CPU executes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags(cpuinfo_text) & NATIVE_BF16_CPU_FLAGS)


def resolve_precision(
    precision: str | int | None,
    accelerator: str | None = "auto",
    *,
    cpuinfo_text: str | None = None,
    cuda_available: bool | None = None,
    cuda_bf16: bool | None = None,
) -> str | int | None:
    """Turn ``"auto"`` into a concrete Lightning precision; anything else is returned unchanged.

    accelerator: the Trainer's accelerator; "cpu" forces the CPU rule even when CUDA is present.
    The keyword arguments exist for tests (mocked ``/proc/cpuinfo`` text and CUDA answers).
    """
    if precision is None or str(precision) != AUTO:
        return precision
    accel = (accelerator or "auto") if isinstance(accelerator, str) else "auto"
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if accel in ("auto", "gpu", "cuda") and cuda_available:
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        return "bf16-mixed" if cuda_bf16 else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16(cpuinfo_text) else "32-true"


def describe_choice(resolved: str | int | None, cpuinfo_text: str | None = None) -> str:
    """One line saying what "auto" chose and why, printed at start-up."""
    if resolved == "32-true":
        return (
            "precision auto -> 32-true (no native bf16 on this CPU: bf16 autocast would be emulated and slow)"
        )
    if resolved == "bf16-mixed" and not torch.cuda.is_available():
        found = sorted(cpu_flags(cpuinfo_text) & NATIVE_BF16_CPU_FLAGS)
        return f"precision auto -> bf16-mixed (CPU has native bf16: {', '.join(found)})"
    return f"precision auto -> {resolved} (CUDA)"
