"""Differential privacy: the math of client-level DP-FedAvg (clipping, noise, adaptive clip
norms) and privacy accounting through Opacus' accountants. Pure functions on tensors."""

from fedtune.privacy.accounting import ACCOUNTANTS, PrivacyHistory, epsilon
from fedtune.privacy.client_level import adaptive_clip, clip_update, gaussian_like, update_norm

__all__ = ["ACCOUNTANTS", "PrivacyHistory", "adaptive_clip", "clip_update", "epsilon", "gaussian_like", "update_norm"]
