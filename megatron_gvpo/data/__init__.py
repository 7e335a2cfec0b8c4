"""Prompt datasets, chat templates, the resumable prompt sampler and the toy demo task."""
