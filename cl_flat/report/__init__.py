"""`cl-flat report`: compare finished runs, grouped over seeds, from their result files only (never a model).

`build` reads and compares (groups, statistics over seeds, paired differences, reference runs); `render`
writes report.md, report.csv and the figures.
"""

from cl_flat.report.build import Report, build_report
from cl_flat.report.render import render_csv, render_markdown, write_report

__all__ = ["Report", "build_report", "render_csv", "render_markdown", "write_report"]
