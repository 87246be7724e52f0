"""Engines run models on batches of prompts; they know nothing of Redis or task kinds."""
