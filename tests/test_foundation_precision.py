"""precision "auto": bf16-mixed only with native bf16 (mocked /proc/cpuinfo and CUDA answers)."""

from __future__ import annotations

import pytest

from layermoe.precision import cpu_flags, cpu_has_native_bf16, resolve_precision

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16\n"


def test_cpu_flags_parses_all_processors():
    assert {"avx2", "fma", "bmi2"} <= cpu_flags(AVX2_ONLY)
    assert "avx512_bf16" in cpu_flags(SAPPHIRE_RAPIDS)


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (AVX2_ONLY, "32-true"),
        (AVX512_NO_BF16, "32-true"),
        (SAPPHIRE_RAPIDS, "bf16-mixed"),
        (ARM, "32-true"),
        ("", "32-true"),
    ],
)
def test_auto_on_cpu(cpuinfo, expected):
    assert resolve_precision("auto", "cpu", cpuinfo_text=cpuinfo, cuda_available=False) == expected
    assert cpu_has_native_bf16(cpuinfo) == (expected == "bf16-mixed")


def test_auto_on_cuda_follows_device_support():
    assert (
        resolve_precision("auto", "auto", cpuinfo_text=AVX2_ONLY, cuda_available=True, cuda_bf16=True)
        == "bf16-mixed"
    )
    assert (
        resolve_precision("auto", "gpu", cpuinfo_text=AVX2_ONLY, cuda_available=True, cuda_bf16=False)
        == "16-mixed"
    )
    # accelerator=cpu ignores the GPU
    assert (
        resolve_precision("auto", "cpu", cpuinfo_text=AVX2_ONLY, cuda_available=True, cuda_bf16=True)
        == "32-true"
    )


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", 16, None])
def test_explicit_precision_is_untouched(explicit):
    assert resolve_precision(explicit, "cpu", cpuinfo_text=SAPPHIRE_RAPIDS, cuda_available=False) == explicit


def test_trainer_resolves_auto(monkeypatch):
    import layermoe.cli as cli

    monkeypatch.setattr(
        cli,
        "resolve_precision",
        lambda p, a: resolve_precision(p, a, cpuinfo_text=AVX2_ONLY, cuda_available=False),
    )
    trainer = cli.Trainer(precision="auto", accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.precision == "32-true"
    explicit = cli.Trainer(precision="64-true", accelerator="cpu", logger=False, enable_checkpointing=False)
    assert explicit.precision == "64-true"
