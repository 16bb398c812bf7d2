"""The run configuration's schema: one pydantic model per YAML section (docs/configuration.md).

Every default of a run lives here and nowhere else; `cl_flat.config` loads and validates files
against it.
"""

from __future__ import annotations

import functools
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
    ValidationInfo,
    field_validator,
    model_validator,
)

from cl_flat.overrides import NAME_PATTERN, RUN_NAME_TEMPLATE
from cl_flat.registry import METHODS, STRATEGIES, RegisteredConfig
from cl_flat.schedules import SCHEDULES


def _numbers(annotation: Any) -> bool:
    """Whether a field annotation admits int or float but not bool."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return bool({int, float} & set(options)) and bool not in options


class Strict(BaseModel):
    # defer_build: a schema holding a registry's union is built at first use, when the registry can load
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=False, defer_build=True,
                              allow_inf_nan=False)  # no setting means anything at infinity or NaN

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
    """The `lora` block's keys every CL strategy shares; each registered strategy's config class
    (cl_flat.strategies) extends it with `strategy: Literal[<name>]` and its own keys. O-LoRA's λ are
    accepted under every strategy (with these defaults) and used by olora only."""
    strategy: str = "inclora"  # a registered strategy's name (the `lora` block's default)
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    lambda_orth: float = Field(default=0.5, ge=0, description="olora: weight of Σ|A_k A_tᵀ| (k < t)")
    lambda_l2: float = Field(default=0.0, ge=0, description="olora: weight of Σ (‖A_t‖_F + ‖B_t‖_F)")


DEFAULT_STRATEGY = LoraSection.model_fields["strategy"].default


def with_default_strategy(value: Any) -> Any:
    """A `lora` block without `strategy` is the default strategy's."""
    return {**value, "strategy": DEFAULT_STRATEGY} if isinstance(value, dict) and "strategy" not in value else value


# the `lora` block: the config class of the registered strategy it names (resolved when the schema is built)
LoraConfig = Annotated[Any, RegisteredConfig(STRATEGIES), BeforeValidator(with_default_strategy)]


class StrategyTaskConfig:
    """Annotated metadata: a task's own `lora` block, one of the registered strategies' `task_config`
    classes (O-LoRA's λ), resolved when the schema is first built like `RegisteredConfig`."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        classes = tuple(dict.fromkeys(entry.cls.task_config for entry in STRATEGIES.load().values()
                                      if getattr(entry.cls, "task_config", None) is not None))
        return handler.generate_schema(Union[classes] if classes else None)  # noqa: UP007 (a runtime tuple)


# how a task is scored (cl_flat.evaluate): rank classification, or greedy generation compared with the references
Metric = Literal["accuracy", "exact_match", "rouge_l"]

DEFAULT_TEMPLATE = "{instruction}\nOptions: {options}\nInput: {input}\nAnswer:"
TASK_FIELDS = ("instruction", "options")  # placeholders filled from the task; every other one is an example field


def template_fields(template: str) -> tuple[str, ...]:
    """The example fields a prompt template names (`{input}`, `{premise}`), in order of first use, the task's
    own placeholders (TASK_FIELDS) left out. A ValueError on what `str.format` would not fill from names
    alone: unbalanced braces, `{}`/`{0}`, `{a.b}`/`{a[0]}`, a conversion or format spec."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_]\w*", name) or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"placeholder {{{shown}}} is not a field name; write {{name}} (letters, digits, _) "
                             "or a literal brace as {{ or }}")
        if name == "output":
            raise ValueError("{output} is the target the model learns to produce: it cannot be in the prompt")
        if name not in TASK_FIELDS and name not in names:
            names.append(name)
    if not names:
        raise ValueError("the template names no field of the example (e.g. {input}, {premise}); "
                         f"{{{'}, {'.join(TASK_FIELDS)}}} come from the task")
    return tuple(names)


class TaskBase(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    instruction: str | None = None
    prompt_template: str = Field(default=DEFAULT_TEMPLATE, description="{instruction}, {options} from the task; "
                                 "any other {name} is a field of the example (docs/configuration.md)")
    prompt_format: Literal["plain", "chat"] = Field(default="plain", description="chat: the filled template is "
                                                    "the user turn of the tokenizer's chat template")
    chat_system: str | None = Field(default=None, description="chat: the system message (none if unset)")
    metric: Metric | None = None  # None: evaluation.metric
    max_train_samples: int | None = Field(default=None, ge=1, description="a fixed random subset of train")
    # this task's effective settings where it overrides the run-level blocks (see RunConfig.task_training)
    training: TrainingSection | None = None
    flatness: FlatnessConfig | None = None
    # this task's values of some `lora` keys (O-LoRA's λ), merged onto the run's; see Strategy.task_config
    lora: Annotated[Any, StrategyTaskConfig()] | None = None

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        template_fields(value)
        return value

    @field_validator("chat_system")
    @classmethod
    def _chat_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("prompt_format") != "chat":
            raise ValueError("a system message is used only with `prompt_format: chat`")
        return value


class BuiltinTaskConfig(TaskBase):
    source: Literal["builtin"]
    task: str | None = None  # builtin task to generate; defaults to `name`
    n_train: int = Field(default=256, ge=1)
    n_test: int = Field(default=200, ge=1)

    @field_validator("prompt_template")
    @classmethod
    def _builtin_fields(cls, value: str) -> str:
        extra = [name for name in template_fields(value) if name != "input"]
        if extra:
            raise ValueError(f"a builtin task's examples have only {{input}}; the template names {extra}")
        return value


def _labels_are_strings(value: Any) -> Any:
    if isinstance(value, list) and any(isinstance(v, bool) for v in value):
        raise ValueError("a label was read as a boolean (YAML turns unquoted yes/no/true/false into booleans): "
                         "quote the labels, e.g. [\"yes\", \"no\"]")
    if isinstance(value, list) and any(isinstance(v, str) and not v.strip() for v in value):
        raise ValueError("a label is empty; each label must be a non-empty string")
    repeated = sorted({v for v in value if value.count(v) > 1}) if isinstance(value, list) else []
    if repeated and all(isinstance(v, str) for v in repeated):
        raise ValueError(f"label(s) {repeated} repeated; each label must be listed once")
    return value


LabelList = Annotated[Union[Annotated[list[str], Field(min_length=2)], None], BeforeValidator(_labels_are_strings)]


class JsonlTaskConfig(TaskBase):
    source: Literal["jsonl"]
    train: Path | None = Field(default=None, description="the training examples: required for a task, "
                               "optional for a probe (never trained)")
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
    references_field: str | None = Field(default=None, description="a column of lists of strings: every "
                                         "acceptable answer of a row (exact_match, rouge_l), as jsonl's references")

    @model_validator(mode="after")
    def _label_not_in_prompt(self) -> HfTaskConfig:
        if self.label_field in template_fields(self.prompt_template):
            raise ValueError(f"prompt_template names {{{self.label_field}}}, the label_field column: the target "
                             "cannot be in the prompt")
        return self


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
    lr_scheduler: Literal[SCHEDULES] = "constant"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    max_seq_length: int = Field(default=256, ge=8)
    checkpoint_every: int = Field(default=500, ge=0, description="updates between in-task checkpoints; 0 = none")
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_fraction: float = Field(default=0.05, ge=0, le=1,
                                        description="skip: stop once more of a task's updates were skipped")


# ---- flatness method blocks: each method's config class lives beside the method (cl_flat/flatness/<m>.py) ----

# the discriminated union (on `method`) of every registered method's config class, built when a schema
# that uses it is first built (the registry then loads the package's methods and the installed plugins)
FlatnessConfig = Annotated[BaseModel, RegisteredConfig(METHODS)]


@functools.cache
def flatness_adapter() -> TypeAdapter:
    """Validates one flatness block (a dict) into its method's config class."""
    return TypeAdapter(FlatnessConfig)


class EvaluationSection(Strict):
    metric: Metric = "accuracy"
    max_samples_per_task: int | None = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=16, ge=1)
    # the flatness of each task right after it is trained (cl_flat.landscape): average- and worst-case
    # sharpness and the Hessian's top eigenvalue and trace, on the held-out sample below
    sharpness: bool = True
    sharpness_rho: float = Field(default=0.05, gt=0)
    sharpness_samples: int = Field(default=8, ge=1)
    sharpness_ascent_steps: int = Field(default=5, ge=0)
    sharpness_space: Literal["adapter", "merged"] = "adapter"
    sharpness_every_task: bool = Field(default=False, description="also every earlier task after each task "
                                       "(sharpness_matrix.csv)")
    hessian_iters: int = Field(default=20, ge=0, le=1000, description="power-iteration cap for the "
                               "Hessian's top eigenvalue; 0 = not measured")
    hessian_tol: float = Field(default=1e-3, gt=0, lt=1, description="power iteration stops once λ changes by less "
                               "than this, relative")
    hessian_probes: int = Field(default=8, ge=0, le=1000, description="Rademacher probes of the "
                                "Hutchinson trace estimate; 0 = not measured")
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
    timeout_minutes: float = Field(default=5.0, ge=0.1, description="a collective waiting longer ends the run")
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
    lora: LoraConfig = Field(default_factory=lambda: {"strategy": DEFAULT_STRATEGY})
    tasks: list[TaskConfig] = Field(min_length=1)
    # general-ability probes: scored with the tasks at zero-shot and after every task, never trained
    probes: list[TaskConfig] = Field(default_factory=list, description="tasks evaluated after every task but "
                                     "never trained (probe_matrix.csv, metrics.json's probes)")
    training: TrainingSection = Field(default_factory=TrainingSection)
    flatness: FlatnessConfig = Field(default_factory=lambda: {"method": "none"})  # validated (validate_default)
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

    def task_metric(self, index: int) -> str:
        """The metric of task `index`: its own or evaluation.metric."""
        return self.tasks[index].metric or self.evaluation.metric

    def metric_label(self) -> str:
        """What the matrix holds, for titles: the one metric of every task, or "mixed metrics (a, b)"."""
        names = list(dict.fromkeys(self.task_metric(i) for i in range(len(self.tasks))))
        return names[0] if len(names) == 1 else f"mixed metrics ({', '.join(names)})"
