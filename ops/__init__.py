"""What operators touch: the CLI, metrics, compose files, dashboards, record/replay, inspect."""
