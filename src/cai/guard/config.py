"""Typed settings of the guard server (`cai guard serve`): models, the check-and-retry loop, security limits."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from cai.base_config import ModelSpecField, Strict, format_validation_error, load_yaml
from cai.errors import UserError

DEFAULT_REFUSAL_TEMPLATE = (
    "I can't help with this one: it touches on {topic}, which is outside what I can do here. That's a limit of "
    "this service, not a judgement of you. If you tell me more about what you need, I'm glad to help with a "
    "related question or point you to a resource that can."
)


class GuardConfig(Strict):
    """Everything `cai guard serve` needs; CLI flags override a YAML file given with --config."""

    policy: ModelSpecField = Field(
        "smollm2-135m", validate_default=True, description="model spec of the answering model"
    )
    supervisor: ModelSpecField = Field(
        "smollm2-135m", validate_default=True, description="model spec of the checking model (must score log-probs)"
    )
    constitution: str = Field("harmless", description="bundled constitution name or YAML file")
    principles: list[str] = Field(default_factory=list, description="principle names to check (empty: all)")
    threshold: float = Field(0.5, gt=0, lt=1, description="P(violation) at or above which an answer is sent back")
    max_rounds: int = Field(2, ge=0, description="critique→revision rounds before refusing")
    refusal: Literal["template", "generate"] = Field(
        "template",
        description="template: the fixed refusal_template; generate: the policy writes the refusal "
        "in the constitution's refusal_style, checked once, with the template as fallback (strong policies only)",
    )
    refusal_template: str = Field(DEFAULT_REFUSAL_TEMPLATE, description="fixed refusal; may contain {topic}")
    critique_tokens: int = Field(96, ge=1, description="max new tokens of a supervisor critique")
    dtype: str = "auto"
    batch_size: int = Field(16, ge=1, description="scoring batch size of in-process models")
    served_model_name: str = Field("cai-guard", description="the model name clients must send")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="bearer keys; required off loopback")
    allow_prefill: bool = Field(False, description="accept a last message from the assistant (prefill)")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_messages: int = Field(64, ge=1)
    max_chars: int = Field(100_000, ge=1, description="characters of message text in one request, all messages")
    max_json_depth: int = Field(32, ge=4, description="deepest nesting of arrays and objects in a request body")
    max_stop: int = Field(4, ge=0, le=16, description="stop strings per request (OpenAI allows 4)")
    max_stop_chars: int = Field(64, ge=1, le=1024, description="characters per stop string")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a client may ask for")
    default_max_tokens: int = Field(256, ge=1)
    request_timeout_s: float = Field(
        120.0,
        gt=0,
        description="deadline of one request: queueing, answer and "
        "check; past it the work is stopped (or abandoned) and the client gets 503",
    )
    workers: int = Field(1, ge=1, description="requests processed at once (in-process models: keep 1)")
    max_pending: int = Field(32, ge=1, description="requests admitted (running + queued); more get 429")
    max_connections: int | None = Field(
        None,
        ge=1,
        description="HTTP requests handled at once, all endpoints "
        "but /health; more get a JSON 503 (default: 4 × max_pending + 16)",
    )
    audit_log: Path = Field(Path("guard-audit.jsonl"), description="append-only JSONL, one record per request")
    audit_content: bool = Field(False, description="also log prompt and answer text (default: hashes only)")
    audit_max_chars: int = Field(4096, ge=64, description="longest string kept in an audit field (longer: cut)")

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if not k.strip():
                raise ValueError(
                    "an empty API key is not a key; pass a long random string (e.g. openssl rand " "-hex 24)"
                )
            if k != k.strip() or any(c.isspace() for c in k):
                raise ValueError("an API key cannot contain spaces")
        return keys

    @field_validator("audit_log")
    @classmethod
    def _audit_file(cls, path: Path) -> Path:
        if path.is_dir():
            raise ValueError(f"{path} is a directory; pass a file path such as {path / 'guard-audit.jsonl'}")
        return path

    @property
    def connection_limit(self) -> int:
        return self.max_connections or self.max_pending * 4 + 16

    @property
    def loopback(self) -> bool:
        """True when the server binds only to the local machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_security(self) -> None:
        """Refuse to bind beyond loopback without API keys."""
        if not self.loopback and not [k for k in self.api_keys if k.strip()]:
            raise UserError(
                f"--host {self.host} exposes the guard beyond this machine: pass --api-key KEY "
                "(or set CAI_GUARD_API_KEYS) so clients must authenticate, or bind 127.0.0.1"
            )


def load_guard_config(path: Path | None, overrides: dict) -> GuardConfig:
    """A YAML file (optional) with non-None ``overrides`` applied on top; one-line UserError when invalid."""
    data: dict = {}
    if path is not None:
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of guard settings at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None and v != []})
    try:
        return GuardConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(str(path or "guard flags"), exc)) from None
