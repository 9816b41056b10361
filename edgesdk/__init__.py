"""edgesdk: export language models to ONNX for a device, and run them with one small API."""
from __future__ import annotations


__version__ = "0.1.0"

from .errors import EdgeSDKError
from .runtime.generate import GenerationChunk, GenerationConfig, GenerationResult
from .runtime.model import Model, load


def export(source, target: str = "cpu", out=None, **options):
    """Export a model (HF folder, hub id, .gguf or pkg:DIST) to an artifact folder; needs edgesdk[export]."""
    from .exporters import export as _export

    return _export(source, target, out, **options)


__all__ = ["load", "export", "Model", "GenerationConfig", "GenerationResult", "GenerationChunk",
           "EdgeSDKError", "__version__"]
