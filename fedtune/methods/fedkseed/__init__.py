"""FedKSeed (Qin et al., 2024, "Federated Full-Parameter Tuning of Billion-Sized Language
Models with Communication Cost under 18 Kilobytes"): zeroth-order steps along K shared seeds;
clients upload (seed index, scalar) pairs that the coordinator replays (recipe ``fedkseed``)."""
