"""Every row of the accuracy matrix is computed in the precision training uses: with model.dtype fp32
and deepspeed.bf16 the base is cast to bf16 before the zero-shot row (DeepSpeed would cast it when the
first engine starts), and config.yaml says which precision evaluation used."""

from __future__ import annotations

import torch

from cl_flat.config import validate_config


def test_zero_shot_row_uses_the_training_precision(tiny_config):
    from cl_flat.recipes.skeleton import prepare, run_metadata

    tiny_config["model"]["dtype"] = "fp32"
    tiny_config["deepspeed"] = {"zero_stage": 0, "bf16": True}
    config = validate_config(tiny_config)
    _, _, model, _ = prepare(config)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert run_metadata(config, model)["evaluation_precision"] == "bf16"

    tiny_config["deepspeed"]["bf16"] = False
    config = validate_config(tiny_config)
    _, _, model, _ = prepare(config)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert run_metadata(config, model)["evaluation_precision"] == "fp32"
