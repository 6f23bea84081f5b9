"""LoRA adapters: plans, injection through peft, named-tensor state, PEFT export."""

from fedtune.adapters.lora import (
    AdapterError,
    AdapterPlan,
    adapter_parameters,
    adapter_state,
    apply_base_delta,
    split_task_tensors,
    export_adapter,
    fold_cores,
    inject_lora,
    load_adapter_state,
    load_exported_adapter,
)

__all__ = [
    "AdapterError",
    "AdapterPlan",
    "adapter_parameters",
    "adapter_state",
    "apply_base_delta",
    "split_task_tensors",
    "export_adapter",
    "fold_cores",
    "inject_lora",
    "load_adapter_state",
    "load_exported_adapter",
]
