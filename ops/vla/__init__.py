"""`vlmq vla`: the offline VLA pipeline, record -> convert -> train -> eval.

It joins the env side (expert recordings in the capture format, MiniWorld) to the serving
side's model (inference_worker/vla), so it sits above both; the worker never imports it.
Submodules that train import torch; this package file does not.
"""
