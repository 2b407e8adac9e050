"""Checkpoints in: finding and reading them, tiny checkpoints for tests."""
