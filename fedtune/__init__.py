"""fedtune: federated and split fine-tuning of pretrained transformers on edge devices."""

__version__ = "0.1.0"
