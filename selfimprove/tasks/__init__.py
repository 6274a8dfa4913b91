"""Tasks: problem generators with train/held-out splits and rewards."""

from selfimprove.tasks.arithmetic import ArithmeticTask
from selfimprove.tasks.base import Problem, Task, is_correct
from selfimprove.tasks.dyck import DyckTask
from selfimprove.tasks.hf_dataset import HFDatasetTask
from selfimprove.tasks.jsonl import JsonlTask
from selfimprove.tasks.random_calculation import RandomCalculationTask
from selfimprove.tasks.text import TextTask

__all__ = [
    "ArithmeticTask",
    "DyckTask",
    "HFDatasetTask",
    "JsonlTask",
    "Problem",
    "RandomCalculationTask",
    "Task",
    "TextTask",
    "is_correct",
]
