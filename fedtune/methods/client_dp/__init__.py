"""Client-level differential privacy (DP-FedAvg, McMahan et al., 2018, "Learning
Differentially Private Recurrent Language Models"; adaptive clipping, Andrew et al., 2021):
the coordinator clips each update and noises the aggregate (``privacy.dp = "client"``). Server
side only; its options stay in ``strategy.py``, which checks them against the accountants of
``fedtune.privacy``."""
