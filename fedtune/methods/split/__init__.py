"""Split learning (SplitFed, Thapa et al., 2022, "SplitFed: When Federated Learning Meets Split
Learning"; AMAQ codecs on the activations): each device trains the blocks below its cut, the
coordinator the rest (``split.mode = "split"``). Strategy, recipe ``split``, and the options
both halves read."""
