"""Keyed Gaussian noise: W + Z ⊙ S (or Z ⊙ S) as a pure function of a 63-bit key.

On CPU Z is counter-based, element i (row-major index) of a draw under key k being

    x_i = mix(k + (i+1)·γ  mod 2⁶⁴)                        SplitMix64 (Steele, Lea & Flood, OOPSLA 2014)
    mix(z): z ← (z ⊕ z≫30)·0xBF58476D1CE4E5B9; z ← (z ⊕ z≫27)·0x94D049BB133111EB; z ← z ⊕ z≫31
    u₁ = (⌊x_i / 2⁴⁰⌋ + ½) / 2²⁴ ∈ (0, 1),   u₂ = (x_i mod 2²⁴) / 2²⁴ ∈ [0, 1)
    Z_i = √(−2 ln u₁) · cos(2π u₂)                          Box & Muller (1958)

with γ = 0x9E3779B97F4A7C15 (x_0, x_1, … is SplitMix64's stream seeded with k). u₁ carries 24
bits, so |Z| ≤ 5.9; the tail beyond has probability 4·10⁻⁹.

Why not torch's `normal_`: on CPU it is a serial Mersenne Twister, plus a separate pass for
W0 + ε. A counter-based draw has no state, so draw, scale and add fuse into one vectorised loop
over torch's OpenMP threads: `keyed_normal.c`, compiled with the system C compiler on first use
and cached under `$CL_FLAT_CACHE/kernels` (keyed by source, compiler and CPU flags), checked
against the formula when loaded. Without a compiler, for other dtypes than fp32/bf16, or with
`CL_FLAT_COMPILE_NOISE=0`, the same formula runs in torch ops (slower); both agree up to the
rounding of log and cos (~1e-6). torch.compile was not used: its first use is slow and large,
and it miscompiled the index arithmetic of this formula. Measured costs: results/README.md.
On CUDA, Z is one `normal_` from a generator seeded with k.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shlex
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

from cl_flat.files import cache_root

_GAMMA, _MIX1, _MIX2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_SOURCE = Path(__file__).with_suffix(".c")
_log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the formula in torch ops


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def counter_normal(shape: torch.Size | tuple[int, ...], key: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Z of `shape` under `key` in float32, by the module's formula in torch ops (int64 arithmetic
    wraps mod 2⁶⁴ as the formula needs)."""
    n = math.prod(shape)
    x = torch.arange(1, n + 1, dtype=torch.int64, device=device).reshape(shape) * _GAMMA + key
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    x = x ^ _srl(x, 31)
    u1 = (_srl(x, 40).to(torch.float32) + 0.5) * 2.0 ** -24
    u2 = (x & 0xFFFFFF).to(torch.float32) * 2.0 ** -24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def _eager(out: torch.Tensor, base: torch.Tensor, key: int, factor: torch.Tensor, elementwise: bool,
           add: bool) -> None:
    wide = base.to(torch.promote_types(base.dtype, torch.float32))
    eps = counter_normal(out.shape, key) * (factor * wide.abs() if elementwise else factor)
    out.copy_(wide + eps if add else eps)


# ---------------------------------------------------------------- the compiled kernel


class _Kernel:
    """keyed_normal.c, built and loaded on first use; None (eager) if anything fails."""

    FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
    TYPES = {torch.float32: "keyed_gaussian_f32", torch.bfloat16: "keyed_gaussian_bf16"}

    def __init__(self) -> None:
        self._functions: dict[torch.dtype, ctypes._CFuncPtr] | None = None
        self.eager = os.environ.get("CL_FLAT_COMPILE_NOISE", "1") == "0"

    def function(self, dtype: torch.dtype):
        if self.eager or dtype not in self.TYPES:
            return None
        if self._functions is None:
            try:
                self._functions = self._load()
            except Exception as error:  # no compiler, odd platform, wrong values: eagerly instead
                _log.warning("cl-flat: the compiled CPU noise kernel is unavailable (%s: %s); drawing noise "
                             "in torch ops (slower, same values)", type(error).__name__, str(error)[-300:])
                self.eager = True
                return None
        return self._functions[dtype]

    def _load(self) -> dict:
        compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")[:1]
        library = self._build(compiler)
        lib = ctypes.CDLL(str(library))
        functions = {}
        for dtype, name in self.TYPES.items():
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64,
                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
            fn.restype = None
            functions[dtype] = fn
        self._check(functions)
        return functions

    def _build(self, compiler: list[str]) -> Path:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        digest = hashlib.sha256("\0".join([_SOURCE.read_text(), version, cpu, *self.FLAGS]).encode()).hexdigest()[:16]
        library = cache_root() / "kernels" / f"keyed_normal-{digest}.so"
        if library.exists():
            return library
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
            # fast-math only when compiling (vectorised logf/cosf); linking with it would add
            # crtfastmath, which flushes denormals for the whole process
            subprocess.run([*compiler, "-c", *self.FLAGS, str(_SOURCE), "-o", str(obj)], capture_output=True,
                           text=True, check=True)
            subprocess.run([*compiler, "-shared", "-fopenmp", str(obj), "-o", str(lib), "-lm"], capture_output=True,
                           text=True, check=True)
            os.replace(lib, library)
        return library

    @staticmethod
    def _check(functions: dict) -> None:
        """The loaded kernel against the torch formula: several vector widths, a tail, both dtypes."""
        base = torch.linspace(-1, 1, 3 * 37).reshape(3, 37)
        factor = torch.tensor([[0.5], [1.0], [2.0]])
        for dtype, fn in functions.items():
            b = base.to(dtype)
            got = torch.empty_like(b)
            fn(b.data_ptr(), got.data_ptr(), 3, 37, 0x5EED, factor.data_ptr(), 1, 0, 1)
            ref = torch.empty_like(b)
            _eager(ref, b, 0x5EED, factor, False, True)
            if not torch.allclose(got.float(), ref.float(), rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2):
                raise RuntimeError(f"compiled noise ({dtype}) differs from the formula by "
                                   f"{(got.float() - ref.float()).abs().max().item():.3g}")


_KERNEL = _Kernel()
_CUDA_GENERATORS: dict[torch.device, torch.Generator] = {}


def _cpu(base: torch.Tensor, key: int, factor: torch.Tensor | float, elementwise: bool, add: bool,
         out: torch.Tensor) -> torch.Tensor:
    factor = torch.as_tensor(factor, dtype=torch.float32).detach()
    rows = base.shape[0] if base.dim() else 1
    per_row = factor.numel() > 1 and factor.numel() == rows and factor.shape[0] == rows
    fn = _KERNEL.function(base.dtype)
    if fn is None or not (factor.numel() == 1 or per_row) or not out.is_contiguous() or out.dtype != base.dtype:
        _eager(out, base, key, factor, elementwise, add)
        return out
    # keep the contiguous tensors referenced while the kernel reads them; a plain draw reads no weight
    source, factor = (base.contiguous() if add or elementwise else None), factor.contiguous()
    fn(None if source is None else source.data_ptr(), out.data_ptr(), rows, out.numel() // max(rows, 1), key,
       factor.data_ptr(), 1 if per_row else 0, int(elementwise), int(add))
    return out


@torch.no_grad()
def keyed_gaussian(base: torch.Tensor, key: int, factor: torch.Tensor | float, *, elementwise: bool = False,
                   add: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """base + Z ⊙ S (`add`) or Z ⊙ S, with S = factor (a scalar or one value per row, broadcastable
    to `base`), times |base| if `elementwise`; in base's dtype, written into `out` (contiguous,
    base's shape and dtype) if given."""
    base = base.detach()
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    if base.device.type == "cpu":
        return _cpu(base, key, factor, elementwise, add, out)
    generator = _CUDA_GENERATORS.get(out.device)
    if generator is None:
        generator = _CUDA_GENERATORS[out.device] = torch.Generator(device=out.device)
    z = out.normal_(generator=generator.manual_seed(key))
    s = base.abs().mul_(factor) if elementwise else factor
    if not add:
        return z.mul_(s)
    if isinstance(s, torch.Tensor):
        return torch.addcmul(base, z, s.to(z.dtype), out=z)
    return torch.add(base, z, alpha=s, out=z)


def standard_normal(shape: torch.Size | tuple[int, ...], key: int, device: torch.device | str,
                    dtype: torch.dtype) -> torch.Tensor:
    """Z ~ N(0, I) of `shape` under `key` (S = 1)."""
    return keyed_gaussian(torch.empty(shape, dtype=dtype, device=device), key, 1.0, add=False)


__all__ = ["counter_normal", "keyed_gaussian", "standard_normal"]
