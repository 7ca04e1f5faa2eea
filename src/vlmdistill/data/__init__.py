"""Datasets, splits, image views and the demo world."""
