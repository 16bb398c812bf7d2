"""`cl-flat report`: compare finished runs, grouped over seeds, from their result files only (never a model).

`runs` loads run folders; `groups` groups them over seeds and task orders (reference runs apart) and chooses
the baseline; `build` reads and compares (statistics, paired differences, reference measures, `published`
numbers); `flatness` relates each task's flatness to its forgetting; `render` writes report.md and
report.csv, `figures` the figures.
"""

from cl_flat.report.build import Report, build_report
from cl_flat.report.render import render_csv, render_markdown, write_report

__all__ = ["Report", "build_report", "render_csv", "render_markdown", "write_report"]
