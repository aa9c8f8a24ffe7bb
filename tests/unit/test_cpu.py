"""The one /proc/cpuinfo reader: the bf16 kernel path the demo's report names and its precision choice reads."""

from mm_llama import cpu

AMD = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n"
XEON = "model name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile\n"
OLD = "model name\t: Old CPU\nflags\t\t: sse2 avx2\n"


def test_bf16_kernel_path(monkeypatch):
    for text, units, path in [
        (AMD, ["avx512_bf16"], "AMD EPYC, bf16 via AVX-512"),
        (XEON, ["amx_bf16", "avx512_bf16"], "Intel(R) Xeon(R) Platinum, bf16 via AMX"),
        (OLD, [], "Old CPU, fp32 fallback (no bf16 units)"),
        ("", [], "unknown CPU, fp32 fallback (no bf16 units)"),
    ]:
        monkeypatch.setattr(cpu, "cpu_info", lambda t=text: t)
        assert cpu.cpu_bf16_units() == units
        assert cpu.cpu_has_bf16() == bool(units)
        assert cpu.cpu_kernel_path() == path


def test_flags_are_whole_words(monkeypatch):
    """A flag name inside another word is not the flag."""
    monkeypatch.setattr(cpu, "cpu_info", lambda: "flags\t: xavx512_bf16x amx_bf16_off\n")
    assert cpu.cpu_bf16_units() == [] and not cpu.cpu_has_bf16()
