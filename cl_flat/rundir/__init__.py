"""A run's results folder, by job: `layout` (where each file lives, its atomic writes and readers: RunDir),
`resume` (starting or resuming a run in it), `checks` (what a command checks before it reads a saved run)."""

from cl_flat.rundir.layout import RunDir

__all__ = ["RunDir"]
