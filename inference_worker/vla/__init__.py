"""QwenVLA: a frozen Qwen-VL, features of one of its layers, and a flow-matching action
expert that turns the features of frames t-4, t-2, t into a chunk of actions.

Submodules import torch; this package file does not, so `vlmq vla convert` and the
recording tools stay light.
"""
