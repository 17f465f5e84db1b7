"""Package versions recorded with every artifact."""

from __future__ import annotations

import platform
from importlib import metadata


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("llmprune", "torch", "transformers", "accelerate", "datasets", "safetensors", "gguf", "lm_eval",
                 "huggingface_hub"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return out
