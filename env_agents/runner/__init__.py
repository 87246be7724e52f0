"""`vlmq agents`: N agent sessions over P processes, each process one event loop."""
