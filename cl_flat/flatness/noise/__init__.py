"""Noise for RWP, LPF-SGD and Flat-LoRA: ε = Z ⊙ S, never stored for the whole model.

Z ~ N(0, 1) is a pure function of a key hashed from (method seed, update, rank, micro-batch,
tensor name) (`keyed_normal`: counter-based and fused with W0 + ε on CPU, a seeded `normal_` on
CUDA): the same key always gives the same ε, another key another ε, and torch's global RNG is
never touched. `scales`: the noise families (S; `noise_scale` is the contract); `functional`: how
ε reaches frozen and trainable weights in one pass; `fisher`: the row Fisher of the `fisher` type.
"""

from cl_flat.flatness.noise.fisher import FISHER_ESTIMATES, RowFisher, param_module
from cl_flat.flatness.noise.functional import (
                                               NOISE_TARGETS,
                                               SCOPES,
                                               FrozenTarget,
                                               NoiseBuffers,
                                               frozen_targets,
                                               keyed_noise,
                                               noisy_mean_gradient,
                                               perturbed,
)
from cl_flat.flatness.noise.keyed_normal import standard_normal
from cl_flat.flatness.noise.scales import NOISE_TYPES, Scale, compact_scale, compact_scales, noise_scale
from cl_flat.seeding import noise_key

__all__ = ["FISHER_ESTIMATES", "NOISE_TARGETS", "NOISE_TYPES", "SCOPES", "FrozenTarget", "NoiseBuffers", "RowFisher",
           "Scale", "compact_scale", "compact_scales",
           "frozen_targets", "keyed_noise", "noise_key", "noise_scale", "noisy_mean_gradient",
           "param_module", "perturbed", "standard_normal"]
