"""Task data: sources (builtin, jsonl, hf) -> examples -> tokenised batches."""

from cl_flat.data.sources import DataError, Example, TaskData, check_local_data, load_task

__all__ = ["DataError", "Example", "TaskData", "check_local_data", "load_task"]
