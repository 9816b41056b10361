"""Run an artifact: onnxruntime + numpy + tokenizers only (no torch, no transformers)."""
