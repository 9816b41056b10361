"""Distribution, above the artifact: signing, verification and provenance (and, with issue 14,
build matrices and ONNX Runtime model packages). Reads and writes artifacts through
``edgesdk.artifact`` only. Nothing here is imported by ``import edgesdk``."""
