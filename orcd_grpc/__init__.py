"""orcd: a GPU inference worker for GGUF language models, served over gRPC."""

__version__ = "0.1.0"
