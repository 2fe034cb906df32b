"""Exporters: write an artifact in a runtime's format (safetensors today; ONNX and GGUF to come)."""
