"""CEG CPU kernels: fp32 Linear layers through oneDNN, and what the CPU computes natively.

PyTorch's CPU wheels run fp32 ``nn.Linear`` through MKL, whose dispatcher picks its AVX2 code path
on non-Intel CPUs even where AVX-512 is available (AMD Zen 4/5). oneDNN, which the same wheels carry,
chooses its kernels from the CPU's instruction set alone, so on such CPUs it runs the same fp32
products about twice as fast (measured on the encoder's own shapes). :func:`use_onednn_linear`
swaps every plain fp32 ``nn.Linear`` of a CPU model for :class:`OneDnnLinear`, which keeps the same
weight tensors (no copy) and computes the same fp32 product in another summation order (results
agree to float rounding, about 1e-6). It checks the kernel against ``torch.nn.functional.linear``
once per process and leaves the model as it is where the kernel is missing or disagrees.

:func:`native_bf16` tells whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX); only there is
``encode.dtype=bf16`` a fast mode on a CPU (elsewhere bf16 is emulated and slower than fp32).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_CHECK_TOLERANCE = 1e-4  # max |difference| on the check's unit-scale product (float rounding is ~1e-6)


@lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether oneDNN's fp32 linear kernel runs here and agrees with ``torch.nn.functional.linear``."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 16, generator=gen)
        w = torch.randn(24, 16, generator=gen) / 4
        b = torch.randn(24, generator=gen)
        with torch.inference_mode():
            got = op(x, w, b, "none", [], "")
            want = torch.nn.functional.linear(x, w, b)
        return got.shape == want.shape and float((got - want).abs().max()) < _CHECK_TOLERANCE
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _onednn_linear_class():
    import torch

    class OneDnnLinear(torch.nn.Module):
        """``nn.Linear`` in fp32 through oneDNN (same weights, same result up to float rounding)."""

        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = linear.weight
            self.bias = linear.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 2:
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
    """Swap each plain fp32 CPU ``nn.Linear`` of ``model`` for :class:`OneDnnLinear`, in place.

    Returns how many layers were swapped (0 where oneDNN's kernel is not available). Subclasses of
    ``nn.Linear`` and quantised layers are left alone.
    """
    import torch

    if not onednn_linear_available():
        return 0
    cls = onednn_linear_type()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, cls(child))
                swapped += 1
    return swapped


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
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
