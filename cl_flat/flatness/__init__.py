"""Flatness methods: one file per method (its config class beside it, `@register(name, Config)`), found by
the registry without an import list, plus the public helpers.

`reference_update` and `noise_scale` are contracts: users and outside checks import them from here;
`FlatnessMethod`, `StepContext` and `register` are what an outside method (entry-point group
`cl_flat.flatness`) is written against.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from cl_flat.flatness.base import FlatnessMethod, StepContext, build_method, register
from cl_flat.flatness.noise import noise_scale
from cl_flat.flatness.reference import TorchContext, reference_update
from cl_flat.registry import METHODS


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def describe_methods() -> list[dict[str, Any]]:
    """Every registered method with its parameters, defaults, constraints and formula,
    generated from the registry and the config models (`cl-flat methods`)."""
    described = []
    for name, entry in METHODS.load().items():
        cls = entry.cls
        parameters = []
        for field, info in cls.config_class.model_fields.items():
            if field == "method":
                continue
            bounds = [f"{op} {getattr(m, attr)}" for m in info.metadata
                      for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if hasattr(m, attr)]
            parameters.append({"name": field, "type": _type_name(info.annotation),
                               "default": info.get_default(call_default_factory=True),
                               "description": ", ".join(filter(None, [info.description, *bounds]))})
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        described.append({"method": name, "formula": cls.formula, "summary": summary,
                          "versus_notes": cls.versus_notes, "source": entry.source, "parameters": parameters})
    return described


__all__ = ["FlatnessMethod", "StepContext", "TorchContext", "build_method", "describe_methods", "noise_scale",
           "reference_update", "register"]
