"""vlmdistill: distill a CLIP-style teacher into a small open-vocabulary student image encoder."""

__version__ = "0.1.0"
