"""The run configuration's schema: one pydantic model per YAML section of the README.

Every default of a run lives here and nowhere else; `cl_flat.config` loads and validates files
against it.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from cl_flat.overrides import NAME_PATTERN, RUN_NAME_TEMPLATE


def _numbers(annotation: Any) -> bool:
    """Whether a field annotation admits int or float but not bool."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return bool({int, float} & set(options)) and bool not in options


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _bools_are_not_numbers(cls, data: Any) -> Any:
        # pydantic would read true/false as 1/0, but in YAML that is a slip (`r: yes`): the number
        # field gets the word instead and rejects it with its own message, at its own path
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: str(v).lower() if isinstance(v, bool) and k in fields and _numbers(fields[k].annotation) else v
                    for k, v in data.items()}
        return data


class RunSection(Strict):
    name: str = Field(default="run", pattern=RUN_NAME_TEMPLATE, description="the results folder's name; "
                      "{dotted.key} placeholders are filled from the validated config (load_config)")
    output_dir: Path = Path("results")
    seed: int = Field(default=42, ge=0)


class ModelSection(Strict):
    name_or_path: str = Field(
        description="HF id, local folder, builtin:smollm2-135m, tiny-random:llama, tiny-random:gpt2 or tiny-random:t5"
    )
    dtype: Literal["fp32", "bf16"] = "fp32"


class LoraSection(Strict):
    strategy: Literal["inclora", "seqlora", "olora"] = "inclora"
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    lambda_orth: float = Field(default=0.5, ge=0, description="olora: weight of Σ|A_k A_tᵀ| (k < t)")
    lambda_l2: float = Field(default=0.0, ge=0, description="olora: weight of Σ (‖A_t‖_F + ‖B_t‖_F)")


class OLoraWeights(Strict):
    """A task's own O-LoRA weights (tasks[i].lora); what it leaves out is the run-level value,
    filled in when the config is read (see RunConfig.task_lora)."""
    lambda_orth: float = Field(ge=0, description="olora: this task's weight of Σ|A_k A_tᵀ|")
    lambda_l2: float = Field(ge=0, description="olora: this task's weight of Σ (‖A_t‖_F + ‖B_t‖_F)")


DEFAULT_TEMPLATE = "{instruction}\nOptions: {options}\nInput: {input}\nAnswer:"
TEMPLATE_FIELDS = {"instruction", "options", "input"}


class TaskBase(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    instruction: str | None = None
    prompt_template: str = DEFAULT_TEMPLATE
    metric: Literal["accuracy", "exact_match"] | None = None  # None: evaluation.metric
    max_train_samples: int | None = Field(default=None, ge=1, description="a fixed random subset of train")
    # this task's effective settings where it overrides the run-level blocks (see RunConfig.task_training)
    training: TrainingSection | None = None
    flatness: FlatnessConfig | None = None
    lora: OLoraWeights | None = None  # O-LoRA's λ of this task (its scripts/long.sh varies them by task)

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        used = set(re.findall(r"{(\w*)}", value))
        unknown = used - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(TEMPLATE_FIELDS)}")
        if "input" not in used:
            raise ValueError("the template must contain {input}")
        return value


class BuiltinTaskConfig(TaskBase):
    source: Literal["builtin"]
    task: str | None = None  # builtin task to generate; defaults to `name`
    n_train: int = Field(default=256, ge=1)
    n_test: int = Field(default=200, ge=1)


def _labels_are_strings(value: Any) -> Any:
    if isinstance(value, list) and any(isinstance(v, bool) for v in value):
        raise ValueError("a label was read as a boolean (YAML turns unquoted yes/no/true/false into booleans): "
                         "quote the labels, e.g. [\"yes\", \"no\"]")
    return value


LabelList = Annotated[Union[Annotated[list[str], Field(min_length=2)], None], BeforeValidator(_labels_are_strings)]


class JsonlTaskConfig(TaskBase):
    source: Literal["jsonl"]
    train: Path
    test: Path
    labels: LabelList = None


class HfTaskConfig(TaskBase):
    source: Literal["hf"]
    dataset: str
    subset: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    train_split: str = "train"
    test_split: str = "test"
    text_field: str = "text"
    label_field: str = "label"
    labels: LabelList = None  # names for integer labels


TaskConfig = Annotated[
    Union[BuiltinTaskConfig, JsonlTaskConfig, HfTaskConfig], Field(discriminator="source")
]


class TrainingSection(Strict):
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="updates per task; overrides epochs")
    micro_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1.0e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adamw"] = "adamw"
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    max_seq_length: int = Field(default=256, ge=8)
    checkpoint_every: int = Field(default=500, ge=0, description="updates between in-task checkpoints; 0 = none")
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_fraction: float = Field(default=0.05, ge=0, le=1,
                                        description="skip: stop once more of a task's updates were skipped")


# ---- flatness method blocks (contract: names as users write them) ----


class NoneMethod(Strict):
    method: Literal["none"]


class SamMethod(Strict):
    method: Literal["sam"]
    rho: float = Field(default=0.05, ge=0)
    adaptive: bool = False
    eta: float = Field(default=0.01, ge=0, description="ASAM's T = |θ| + eta (adaptive only)")
    norm: Literal["global", "per_tensor"] = "global"


NoiseType = Literal["gauss_standard", "gauss_matrix", "gauss_element", "lpf_sgd", "fisher", "flat_lora"]
Scope = Literal["lora", "full", "base"]


class RwpMethod(Strict):
    method: Literal["rwp"]
    scope: Scope = "full"
    noise_type: NoiseType = "gauss_standard"
    noise_std: float = Field(default=0.0015, ge=0)
    a: float = Field(default=0.5, ge=0, description="weight of the clean gradient")
    b: float = Field(default=0.5, ge=0, description="weight of the noisy gradient")
    two_batch: bool = False
    one_pass: bool = Field(default=False, description="two_batch in one forward: first half of each micro-batch "
                                                      "clean, second half noisy")
    parallel: bool = False
    fisher_decay: float = Field(default=0.95, ge=0, lt=1)
    fisher_eta: float = Field(default=1.0, ge=0, description="η on F normalised to mean 1 per layer")
    fisher_estimate: Literal["minibatch", "per_token"] = "minibatch"
    noise_targets: Literal["adapted", "all_linear"] = "adapted"


class LpfSgdMethod(Strict):
    method: Literal["lpf_sgd"]
    scope: Scope = "full"
    noise_std: float = Field(default=0.0005, ge=0, description="γ0, the initial radius")
    radius_growth: float = Field(default=6.0, ge=0, description="α: γ_T = (α+1)·γ0")


class FlatLoraMethod(Strict):
    method: Literal["flat_lora"]
    noise_std: float = Field(default=0.05, ge=0)
    ramp: Literal["cosine", "linear", "constant"] = "cosine"


FLATNESS_METHODS = (NoneMethod, SamMethod, RwpMethod, LpfSgdMethod, FlatLoraMethod)
FlatnessConfig = Annotated[Union[FLATNESS_METHODS], Field(discriminator="method")]
FlatnessAdapter: TypeAdapter = TypeAdapter(FlatnessConfig)


class EvaluationSection(Strict):
    metric: Literal["accuracy", "exact_match"] = "accuracy"
    max_samples_per_task: int | None = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=16, ge=1)
    sharpness: bool = False  # average- and worst-case sharpness after each task (cl_flat.landscape)
    sharpness_rho: float = Field(default=0.05, gt=0)
    sharpness_samples: int = Field(default=8, ge=1)
    sharpness_ascent_steps: int = Field(default=5, ge=0)
    sharpness_space: Literal["adapter", "merged"] = "adapter"
    # every landscape grid point and sharpness sample is a full pass over the held-out sample
    landscape_max_samples: int = Field(default=8, ge=1, description="held-out examples of landscapes and sharpness "
                                       "(at most max_samples_per_task)")

    def landscape_samples(self) -> int:
        """The held-out sample size of landscapes and sharpness: min(max_samples_per_task, landscape_max_samples)."""
        cap = self.max_samples_per_task
        return self.landscape_max_samples if cap is None else min(cap, self.landscape_max_samples)


class DeepSpeedSection(Strict):
    zero_stage: Literal[0, 1, 2] = 0
    bf16: bool = False
    timeout_minutes: float = Field(default=5.0, gt=0, description="a collective waiting longer ends the run")
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config")

    @field_validator("extra")
    @classmethod
    def _no_optimizer(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = {"optimizer", "scheduler", "train_batch_size", "train_micro_batch_size_per_gpu",
                 "gradient_accumulation_steps", "zero_optimization", "bf16", "gradient_clipping"}
        clash = sorted(owned & set(value))
        if clash:
            raise ValueError(f"must not define {clash}: the tool sets them from the config sections")
        return value


class WandbSection(Strict):
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "cl-flat"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    init_timeout: float = Field(default=30.0, gt=0, description="seconds to reach the server; then offline")


class LoggingSection(Strict):
    wandb: WandbSection = Field(default_factory=WandbSection)
    progress: bool = True


class ReplaySection(Strict):
    examples_per_task: int = Field(default=0, ge=0, description="experience replay: training examples of each "
                                   "earlier task mixed into every later task's training set; 0 = none")


class RunConfig(Strict):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    tasks: list[TaskConfig] = Field(min_length=1)
    training: TrainingSection = Field(default_factory=TrainingSection)
    flatness: FlatnessConfig = Field(default_factory=lambda: NoneMethod(method="none"))
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    replay: ReplaySection = Field(default_factory=ReplaySection)

    def task_training(self, index: int) -> TrainingSection:
        """The training settings of task `index`: its own block (run-level + its overrides) or the run's."""
        return self.tasks[index].training or self.training

    def task_flatness(self, index: int):
        """The flatness method block of task `index`: its own or the run's."""
        return self.tasks[index].flatness or self.flatness

    def task_lora(self, index: int) -> OLoraWeights | LoraSection:
        """The O-LoRA weights (lambda_orth, lambda_l2) of task `index`: its own or the run's."""
        return self.tasks[index].lora or self.lora
