"""`cl-flat validate`: a config and its local data checked, nothing trained."""

from __future__ import annotations

from pathlib import Path

from cl_flat.config import RunConfig, load_config
from cl_flat.data import check_local_data, load_task
from cl_flat.models import check_chat_templates, check_target_modules, load_tokenizer, model_family, module_names
from cl_flat.recipes.skeleton import check_batches, check_output_dir, task_methods


def validate(path: Path, overrides: list[str]) -> tuple[RunConfig, list[str]]:
    """The resolved config and notes on what was not checked; a ConfigError/DataError on a problem.
    Checks every method, every local data file of the tasks and probes (never downloads) and, where the model
    is known without loading it, the LoRA target modules and (chat tasks) the chat template."""
    config = load_config(path, overrides)
    check_output_dir(config, str(path))
    task_methods(config, str(path))
    notes = check_local_data(config)
    local = [i for i, task in enumerate(config.tasks) if not any(f"tasks[{task.name}]" in n for n in notes)]
    tasks = [load_task(config.tasks[i], config.run.seed, config.evaluation.metric) for i in local]
    # one process: the smallest global batch (more ranks only make it larger)
    check_batches(config.model_copy(update={"tasks": [config.tasks[i] for i in local]}), tasks, 1, str(path))
    notes += check_local_data(config.model_copy(update={"tasks": config.probes}))  # probes' data, like the tasks'
    names = module_names(config.model.name_or_path)
    if names is not None:
        check_target_modules(config.lora.target_modules, names, model_family(config.model.name_or_path))
    else:
        notes.append(f"model {config.model.name_or_path!r}: target modules checked when training starts")
    if any(task.prompt_format == "chat" for task in config.tasks):
        tokenizer = load_tokenizer(config.model.name_or_path)
        if tokenizer is None:
            notes.append(f"model {config.model.name_or_path!r}: chat template checked when training starts")
        else:
            check_chat_templates(config, tokenizer, str(path))
    return config, notes
