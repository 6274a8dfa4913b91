"""Tasks: problem generators with train/held-out splits and rewards."""

from selfimprove.tasks.arithmetic import ArithmeticTask
from selfimprove.tasks.base import Problem, Task, is_correct
from selfimprove.tasks.jsonl import JsonlTask

__all__ = ["ArithmeticTask", "JsonlTask", "Problem", "Task", "is_correct"]
