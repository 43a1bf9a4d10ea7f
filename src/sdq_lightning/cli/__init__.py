"""Hydra entry points (train; export lives in ``cli.export``)."""
