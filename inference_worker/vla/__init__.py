"""QwenVLA: a frozen Qwen-VL, features of one of its layers, and a flow-matching action
expert that turns the features of frames t-4, t-2, t into a chunk of actions.

What serves it lives here; training and evaluation are in ops/vla (`vlmq vla`).
Submodules import torch; this package file does not, so reading a VLA's config stays light.
"""
