"""Generation backends behind one protocol (see base.py), created from a model spec by ``get_backend``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai.backends.base import (
    Backend,
    Chat,
    ContextLengthError,
    DeadlineExceeded,
    Generation,
    Prefix,
    SamplingParams,
    check_deadline,
    choice_probs,
    deadline,
    truncate_at_stop,
)
from cai.errors import UserError

if TYPE_CHECKING:
    from cai.models import ModelSpec

__all__ = [
    "Backend",
    "Chat",
    "ContextLengthError",
    "DeadlineExceeded",
    "Generation",
    "Prefix",
    "SamplingParams",
    "check_deadline",
    "choice_probs",
    "deadline",
    "get_backend",
    "truncate_at_stop",
]


def get_backend(
    spec: str | ModelSpec, *, batch_size: int = 16, dtype: str = "auto", concurrency: int = 8, device: str | None = None
) -> Backend:
    """Create the backend a model spec names: in-process transformers, OpenAI-compatible HTTP, or vLLM. The spec
    is parsed here once and handed on parsed."""
    from cai.models import as_spec

    parsed = as_spec(spec)
    spec = parsed.raw
    if parsed.kind == "openai":
        from cai.backends.openai import OpenAIBackend

        return OpenAIBackend(spec, parsed.target, parsed.base_urls, concurrency=concurrency)
    if parsed.kind == "vllm":
        try:
            from cai.backends.vllm import VLLMBackend
        except ImportError as exc:
            raise UserError(
                f"model spec {spec!r} needs the vllm extra and a GPU (pip install 'cai-lab[vllm]'): " f"{exc}"
            ) from None
        return VLLMBackend(spec, parsed.target)
    from cai.backends.hf import HFBackend

    return HFBackend(parsed, batch_size=batch_size, dtype=dtype, device=device)
