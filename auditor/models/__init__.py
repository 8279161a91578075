"""Architectures: the registry, inference from checkpoints, and anatomy."""
