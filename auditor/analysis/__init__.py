"""Analyses: arrays in, frozen dataclasses out; no printing, no file formats."""
