"""Multi-label open-vocabulary recognition (the paper's robotics experiment, §8 / Table 12): pure building blocks.

Scene readers (PickClutter h5, multi-label CSV), the DualCoOp-style and fixed-text region heads, the asymmetric
loss with its learned score bias, and the accuracy / F1 / mAP metrics. Nothing here trains or writes runs.
"""
