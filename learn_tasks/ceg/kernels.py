"""CEG CPU kernels: Linear layers through oneDNN, and what the CPU computes natively.

PyTorch's CPU wheels run fp32 ``nn.Linear`` through MKL, whose dispatcher picks its AVX2 code path
on non-Intel CPUs even where AVX-512 is available (AMD Zen 4/5). oneDNN, which the same wheels carry,
chooses its kernels from the CPU's instruction set alone, so on such CPUs it runs the same fp32
products about twice as fast (measured on the encoder's own shapes). :func:`use_onednn_linear`
swaps every plain fp32 ``nn.Linear`` of a CPU model for :class:`OneDnnLinear`, which keeps the same
weight tensors (no copy) and computes the same fp32 product in another summation order (results
agree to float rounding, about 1e-6). On a CPU with native bf16 arithmetic it swaps bf16 layers too
(the same oneDNN kernel that ``F.linear`` reaches, called directly: about 15% faster). It checks the
kernel against ``torch.nn.functional.linear`` once per process and dtype, and leaves the model as it
is where the kernel is missing or disagrees.

:func:`native_bf16` tells whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX); only there is
``encode.dtype=bf16`` a fast mode on a CPU (elsewhere bf16 is emulated and slower than fp32).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# max |difference| on the check's unit-scale product: float rounding is ~1e-6 in fp32, ~1e-2 in bf16
_CHECK_TOLERANCE = {"fp32": 1e-4, "bf16": 0.1}


@lru_cache(maxsize=2)
def onednn_linear_available(dtype: str = "fp32") -> bool:
    """Whether oneDNN's linear kernel runs here in ``dtype`` (fp32 or bf16) and agrees with
    ``torch.nn.functional.linear``."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        x = torch.randn(3, 5, 16, generator=gen).to(tdtype)
        w = (torch.randn(24, 16, generator=gen) / 4).to(tdtype)
        b = torch.randn(24, generator=gen).to(tdtype)
        with torch.inference_mode():
            got = op(x, w, b, "none", [], "")
            want = torch.nn.functional.linear(x, w, b)
        return (got.shape == want.shape and got.dtype == want.dtype
                and float((got.float() - want.float()).abs().max()) < _CHECK_TOLERANCE[dtype])
    except (AttributeError, RuntimeError, NotImplementedError, KeyError):
        return False


def _onednn_linear_class():
    import torch

    class OneDnnLinear(torch.nn.Module):
        """``nn.Linear`` through oneDNN (same weights, same result up to float rounding)."""

        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = linear.weight
            self.bias = linear.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype != self.weight.dtype or x.device.type != "cpu" or x.dim() < 2:
                return torch.nn.functional.linear(x, self.weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, kernel=onednn"

    return OneDnnLinear


_ONEDNN_LINEAR = None


def onednn_linear_type() -> type:
    """The :class:`OneDnnLinear` module class (built on first use: torch is imported lazily)."""
    global _ONEDNN_LINEAR
    if _ONEDNN_LINEAR is None:
        _ONEDNN_LINEAR = _onednn_linear_class()
    return _ONEDNN_LINEAR


def use_onednn_linear(model: "torch.nn.Module") -> int:
    """Swap each plain fp32 CPU ``nn.Linear`` of ``model`` (and each bf16 one, where the CPU has native
    bf16 arithmetic) for :class:`OneDnnLinear`, in place.

    Returns how many layers were swapped (0 where oneDNN's kernel is not available). Subclasses of
    ``nn.Linear``, quantised layers and other dtypes are left alone.
    """
    import torch

    dtypes = {torch.float32} if onednn_linear_available("fp32") else set()
    if native_bf16() and onednn_linear_available("bf16"):
        dtypes.add(torch.bfloat16)
    cls = onednn_linear_type()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is torch.nn.Linear and child.weight.dtype in dtypes
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, cls(child))
                swapped += 1
    return swapped


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in Linux ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where they cannot be read)."""
    return frozenset(_cpuinfo("flags").split())


@lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...; empty where it cannot be read)."""
    return _cpuinfo("vendor_id")


def onednn_pays(dtype: str = "fp32") -> bool:
    """Whether oneDNN's Linear kernel is the faster one here for ``dtype``.

    bf16: on CPUs with native bf16 arithmetic (oneDNN's AVX512-BF16 / AMX kernels). fp32: on CPUs with
    AVX-512 other than Intel's, where PyTorch's default GEMM (MKL) stays on AVX2 and oneDNN's AVX-512
    kernel ran about twice as fast; on Intel, MKL already uses AVX-512 and oneDNN measured slower (208 vs
    291 items/s, MiniLM, 2 cores, a Xeon with AVX-512 and AMX), as on an AVX2-only CPU (390 vs 465).
    """
    if dtype == "bf16":
        return native_bf16()
    return "avx512f" in cpu_flags() and cpu_vendor() != "GenuineIntel"


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    try:
        import torch

        cpu = torch.cpu
        if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported",
                                                                                lambda: False)():
            return True
    except Exception:  # noqa: BLE001 - private torch helpers; the flags below decide then
        pass
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
