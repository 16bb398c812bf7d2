"""How the command line looks: the typer app's help conventions, the tables it prints, and no library
warning spam."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import typer
from typer.core import TyperCommand

if TYPE_CHECKING:
    from cl_flat.metrics import Rows


class Command(TyperCommand):
    """Usage in the usual form, `cl-flat train [OPTIONS] CONFIG` (typer writes `{config}`)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name or "").upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class App(typer.Typer):
    """Plain help (no `<bool>` after flags, no rich markup eating `[i,i]`), -h as --help, usual usage lines."""

    def __init__(self, **options) -> None:
        super().__init__(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                         rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]}, **options)

    def command(self, *args, **options):
        return super().command(*args, cls=options.pop("cls", Command), **options)


def print_matrix(names: list[str], rows: Rows, metrics: dict, title: str, digits: int = 1) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, min_width=len(title))  # a title on one line where the console is wide enough
    table.add_column("after_task")
    for name in names:
        table.add_column(name, justify="right")
    for after, scores in rows:
        table.add_row(after, *("" if s is None else f"{s:.{digits}f}" for s in scores))
    console = Console()
    console.print(table)
    if metrics:
        console.print(format_metrics(metrics))


def print_probes(probes: list[str], rows: Rows, metrics: dict, title: str) -> None:
    """The probes' scores (rows as the accuracy matrix's) and each one's final drift (metrics.json's "probes")."""
    if not probes:
        return
    from rich.console import Console

    print_matrix(probes, rows, {}, title)
    drift = metrics.get("probes") or {}

    def fmt(v):
        return "null" if v is None else f"{v:+.2f}"

    Console().print("final drift (last row − zero_shot): " + "  ".join(
        f"{name}={fmt((drift.get(name) or {}).get('final_drift'))}" for name in probes)
        + f"  mean={fmt(metrics.get('mean_final_drift'))}")


def format_metrics(metrics: dict) -> str:
    def fmt(v):
        return "null" if v is None else f"{v:.2f}"

    from cl_flat.metrics import METRICS, REFERENCE_MEASURES

    line = "  ".join(f"{k}={fmt(metrics[k])}" for k in METRICS)
    line += "".join(f"  {k}={fmt(metrics[k])}" for k, _ in REFERENCE_MEASURES.values() if k in metrics)
    return line + "  OP=[" + ", ".join(fmt(v) for v in metrics["OP"]) + "]"


NOISY_LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "datasets", "huggingface_hub", "accelerate", "gguf",
                   "wandb", "pydantic", "matplotlib")


def quiet_libraries() -> None:
    """The libraries' advisory warnings (deprecations, version notes) say nothing to a cl-flat user;
    warnings raised by cl-flat itself stay visible."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import logging
    import warnings

    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=rf"({'|'.join(NOISY_LIBRARIES)})(\.|$)")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
