"""A PyTorch module as ``model.onnx``, checked against PyTorch on random inputs before anyone relies on it.

Single- and multi-label model folders both ship one; the parity check is what lets their manifests promise
that onnxruntime gives the PyTorch numbers.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_write_bytes

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4


class OnnxParityError(VlmdistillError, ValueError):
    """onnxruntime does not reproduce PyTorch within ``PARITY_TOLERANCE``."""


def export_checked(module: nn.Module, shape: tuple[int, int, int], path: Path, outputs: list[str]) -> float:
    """``module`` (pixels [B, *shape] -> ``outputs``) to ``path`` with a dynamic batch, through io's atomic
    writer; returns onnxruntime's max abs difference from PyTorch on 4 random inputs (refused above
    ``PARITY_TOLERANCE``)."""
    import onnxruntime as ort

    module = module.cpu().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(1, *shape),), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["pixels"], output_names=outputs,
                          dynamic_axes={k: {0: "batch"} for k in ("pixels", *outputs)})
    atomic_write_bytes(path, buffer.getvalue())
    pixels = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels.numpy()})
    with torch.no_grad():
        want = module(pixels)
    diff = max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want, strict=True))
    if diff > PARITY_TOLERANCE:
        raise OnnxParityError(f"{path}: onnxruntime differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE}); "
                              "use the safetensors weights with vlmdistill.load instead")
    return diff
