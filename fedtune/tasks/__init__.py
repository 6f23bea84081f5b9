"""Training tasks: how examples become token batches, and how a model is scored.

Each task is a small class registered by name ("seq-cls", "causal-lm", "seq2seq"); the coordinator, the
client and the simulation only talk to the ``Task`` interface.
"""

from fedtune.tasks.base import CHAT_TEMPLATE_MODES, CHAT_TEMPLATE_OPTION, TASKS, EncodedExample, EvalOptions, Task, get_task
from fedtune.tasks import causal_lm, classification, seq2seq  # noqa: F401  (registers the tasks)

__all__ = ["CHAT_TEMPLATE_MODES", "CHAT_TEMPLATE_OPTION", "TASKS", "EncodedExample", "EvalOptions", "Task", "get_task"]
