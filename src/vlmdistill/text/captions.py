"""Temporary shim: captions moved to ``vlmdistill.data.captions`` (issue 8). Delete once no caller imports it."""

from vlmdistill.data.captions import captions_for, read_captions

__all__ = ["captions_for", "read_captions"]
