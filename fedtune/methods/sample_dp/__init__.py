"""Sample-level differential privacy (DP-SGD, Abadi et al., 2016, "Deep Learning with
Differential Privacy"): every device clips each example's gradient and adds noise
(``privacy.dp = "sample"``). The strategy sends the ``dp_*`` options every recipe understands;
the device's DP-SGD is in ``fedtune.client.recipes.base``."""
