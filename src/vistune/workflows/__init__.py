"""Workflows compose the engine and the tasks: a training run, PVP pre-training, the few-shot protocol."""
