"""Keyed Gaussian noise: W + Z ⊙ S (or Z ⊙ S) as a pure function of a 63-bit key.

On CPU Z is counter-based, element i (row-major index) of a draw under key k being

    x_i = mix(k + (i+1)·γ  mod 2⁶⁴)                        SplitMix64 (Steele, Lea & Flood, OOPSLA 2014)
    mix(z): z ← (z ⊕ z≫30)·0xBF58476D1CE4E5B9; z ← (z ⊕ z≫27)·0x94D049BB133111EB; z ← z ⊕ z≫31
    u₁ = (⌊x_i / 2⁴⁰⌋ + ½) / 2²⁴ ∈ (0, 1),   u₂ = (x_i mod 2²⁴) / 2²⁴ ∈ [0, 1)
    Z_i = √(−2 ln u₁) · cos(2π u₂)                          Box & Muller (1958)

with γ = 0x9E3779B97F4A7C15. (x_i for i = 0, 1, … is exactly SplitMix64's stream seeded with k.)
u₁ carries 24 bits, so |Z| ≤ 5.9: the tail beyond it has probability 4·10⁻⁹.
Why not torch's `normal_`: on CPU it is a serial Mersenne Twister at 3.5-4 ns per element, 0.4 s
for the 106M adapted weights of SmolLM2-135M, drawn twice per noisy pass, plus a separate pass
for W0 + ε. A counter-based draw has no state, so torch.compile (inductor's C++ backend) fuses
draw, scale and add into one vectorised loop over the OpenMP threads: 0.11 s for all 106M on 2
cores. Where compiling fails (no C++ compiler) or `CL_FLAT_COMPILE_NOISE=0`, the same formula runs
eagerly (~3× slower than `normal_`); both agree up to the rounding of log and cos (~1e-6).
On CUDA, Z is one `normal_` from a generator seeded with k (a few ms for a 1B model).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import torch

_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)  # the constants as int64 (two's complement)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_log = logging.getLogger(__name__)


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _counter_normal(like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Z of `like`'s shape under `key`, float32 (the module's formula). `key` holds [k, γ]: with γ a
    literal, inductor folds (i+1)·γ into its C++ loop index, whose signed overflow gcc may then
    miscompile (seen with torch 2.13: wrong values from element 16 on); loaded from a tensor, the
    product stays in wrapping vector arithmetic."""
    index = torch.arange(1, like.numel() + 1, dtype=torch.int64, device=like.device).view(like.shape)
    x = index * key[1] + key[0]
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    x = x ^ _srl(x, 31)
    u1 = (_srl(x, 40).to(torch.float32) + 0.5) * 2.0 ** -24
    u2 = (x & 0xFFFFFF).to(torch.float32) * 2.0 ** -24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def _perturb_into(out: torch.Tensor, base: torch.Tensor, key: torch.Tensor, factor: torch.Tensor,
                  elementwise: bool) -> None:
    """out ← base + Z ⊙ S, S = factor (· |base| if elementwise), computed in ≥ fp32."""
    wide = base.to(torch.promote_types(base.dtype, torch.float32))
    out.copy_(wide + _counter_normal(out, key) * (factor * wide.abs() if elementwise else factor))


def _draw_into(out: torch.Tensor, base: torch.Tensor, key: torch.Tensor, factor: torch.Tensor,
               elementwise: bool) -> None:
    """out ← Z ⊙ S."""
    wide = base.to(torch.promote_types(base.dtype, torch.float32))
    out.copy_(_counter_normal(out, key) * (factor * wide.abs() if elementwise else factor))


class _Kernels:
    """The two CPU kernels, compiled on first use and checked against the eager formula on a
    probe tensor (several vector widths plus a tail); eager for the process if either fails."""

    def __init__(self) -> None:
        self.compiled: dict[Callable, Callable] = {}
        self.eager = os.environ.get("CL_FLAT_COMPILE_NOISE", "1") == "0"

    def run(self, fn: Callable, *args) -> None:
        if self.eager:
            return fn(*args)
        try:
            if fn not in self.compiled:
                self.compiled[fn] = self._checked(fn)
            self.compiled[fn](*args)
        except Exception as error:  # no compiler, unsupported platform, miscompiled: same formula, eagerly
            _log.warning("cl-flat: the compiled CPU noise kernel is unavailable (%s: %s); drawing noise "
                         "eagerly (slower, same values)", type(error).__name__, str(error)[:300])
            self.eager = True
            fn(*args)

    @staticmethod
    def _checked(fn: Callable) -> Callable:
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        base = torch.linspace(-1, 1, 3 * 37).reshape(3, 37)
        key = torch.tensor([0x5EED, _GAMMA], dtype=torch.int64)
        factor = torch.tensor([[0.5], [1.0], [2.0]])
        got, want = torch.empty_like(base), torch.empty_like(base)
        compiled(got, base, key, factor, False)
        fn(want, base, key, factor, False)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"compiled noise differs from the formula by {(got - want).abs().max().item():.3g}")
        return compiled


_KERNELS = _Kernels()
_CUDA_GENERATORS: dict[torch.device, torch.Generator] = {}


def _cuda_normal(out: torch.Tensor, key: int) -> torch.Tensor:
    generator = _CUDA_GENERATORS.get(out.device)
    if generator is None:
        generator = _CUDA_GENERATORS[out.device] = torch.Generator(device=out.device)
    return out.normal_(generator=generator.manual_seed(key))


@torch.no_grad()
def keyed_gaussian(base: torch.Tensor, key: int, factor: torch.Tensor | float, *, elementwise: bool = False,
                   add: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """base + Z ⊙ S (`add`) or Z ⊙ S, with S = factor (a scalar or a tensor broadcastable to `base`,
    e.g. one value per row), times |base| if `elementwise`; in base's dtype, written into `out`
    (contiguous, base's shape and dtype) if given."""
    base = base.detach()
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    if base.device.type == "cpu":
        factor = torch.as_tensor(factor, dtype=torch.float32)
        if factor.dim() == 0:  # one compiled variant for scalar and per-row factors
            factor = factor.reshape((1,) * base.dim())
        _KERNELS.run(_perturb_into if add else _draw_into, out, base,
                     torch.tensor([key, _GAMMA], dtype=torch.int64), factor, elementwise)
        return out
    z = _cuda_normal(out, key)
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


__all__ = ["keyed_gaussian", "standard_normal"]
