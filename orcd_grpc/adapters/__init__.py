"""Architecture adapters, looked up by GGUF general.architecture."""
from __future__ import annotations

import importlib

from ..errors import InvalidArgument
from .base import Adapter

# arch name -> "module:Class"; modules import lazily so one broken adapter cannot stop the others.
REGISTRY: dict[str, str] = {
    "llama": "llama:LlamaAdapter",
    "qwen2": "qwen2:Qwen2Adapter",
    "phi3": "phi3:Phi3Adapter",
    "gemma3": "gemma3:Gemma3Adapter",
    "gpt-oss": "gpt_oss:GptOssAdapter",
}


def adapter_for(arch: str) -> type[Adapter]:
    spec = REGISTRY.get(arch)
    if spec is None:
        raise InvalidArgument(f"architecture {arch!r} is not supported (supported: {', '.join(sorted(REGISTRY))})",
                              field="general.architecture")
    module, cls = spec.split(":")
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as exc:
        raise InvalidArgument(f"architecture {arch!r} is not available in this build", field="general.architecture") from exc
    return getattr(mod, cls)
