"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): the example-weighted mean, made exact slot by slot for clients of different
ranks and depths. Server side only (``strategy.py``); clients train with the plain recipe."""
