"""Fuzz harnesses (run as modules: python -m fuzz.fuzz_gguf)."""
