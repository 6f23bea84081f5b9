"""FedLC (Zhang et al., 2022, "Federated Learning with Label Distribution Skew via Logits
Calibration"): clients train on logits calibrated by their own label distribution (recipe
``fedlc``, a correction; sequence classification only)."""
