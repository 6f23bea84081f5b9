"""Fed-SB (Singh et al., 2025, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency
and Performance in (Private) Federated LoRA Fine-Tuning"): a LoRA variant (``lora.variant``)
with B and A fixed and only a rank x rank core R trained, sent and averaged. Server side only
(the run's plan has cores)."""
