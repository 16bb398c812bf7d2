"""Task data: sources (builtin, jsonl, hf) -> examples -> tokenised batches."""

from cl_flat.data.sources import Example, TaskData, check_local_data, load_task, load_tasks
from cl_flat.errors import DataError

__all__ = ["DataError", "Example", "TaskData", "check_local_data", "load_task", "load_tasks"]
