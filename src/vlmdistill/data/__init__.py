"""Datasets, splits, image sources and views, and per-image captions."""
