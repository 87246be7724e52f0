"""The serving side: the worker loop, the scheduler, one handler per task kind, engines."""
