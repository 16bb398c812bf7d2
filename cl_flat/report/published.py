"""Published average accuracies (AA, percent) that `cl-flat report --published KEY` prints beside the
measured groups, marked as published: O-LoRA's benchmarks on T5-large (Wang et al., "Orthogonal Subspace
Learning for Language Model Continual Learning", EMNLP 2023 Findings, arXiv 2310.14152, Table 1), the
number each method reports: AA after the last task, averaged over the benchmark's three task orders
(standard: orders 1-3, configs/benchmarks/*order{1,2,3}.yaml; long: orders 4-6), unless the source says
otherwise. configs/benchmarks/README.md shows the same table (a test keeps the two equal).

Only numbers with a source are listed; never fill one in from memory.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER = "O-LoRA paper (arXiv 2310.14152), Table 1, T5-large"
RELEASED_LOGS = "O-LoRA repository (cmnfriend/O-LoRA), logs_and_outputs: the authors' rerun"


@dataclass(frozen=True)
class PublishedResult:
    method: str
    aa: float
    source: str


PUBLISHED: dict[str, tuple[PublishedResult, ...]] = {
    "standard": (
        PublishedResult("IncLoRA", 66.4, f"{PAPER}; mean of orders 1/2/3 = 66.0/64.9/68.3"),
        PublishedResult("IncLoRA (released logs, order 1 only)", 68.6, f"{RELEASED_LOGS}, order 1"),
        PublishedResult("O-LoRA", 75.8, f"{PAPER}; mean of orders 1/2/3 = 75.4/75.7/76.3"),
        PublishedResult("O-LoRA (released logs, order 1 only)", 78.4, f"{RELEASED_LOGS}, order 1"),
        PublishedResult("MTL (multi-task upper bound)", 80.0, f"{PAPER}; all tasks trained jointly"),
    ),
    "long": (
        PublishedResult("O-LoRA", 69.6, f"{PAPER}; mean of orders 4/5/6"),
    ),
}
