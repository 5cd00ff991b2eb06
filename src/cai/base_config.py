"""Building blocks of configs: the strict base class, sections every stage shares, and YAML/validation
helpers. Stage modules import from here; ``cai.config`` assembles them into ``RunConfig``."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, field_validator

from cai.backends.base import CHAT_REPETITION_PENALTY
from cai.errors import UserError
from cai.models import ModelSpec, parse_spec

SEED_MAX = 2**32 - 1  # numpy's limit; torch, random and transformers accept it too


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def parsed_spec(value: object) -> ModelSpec:
    """A config field's model spec, parsed (a :class:`ModelSpec` passes through); the parse error as a pydantic
    ValueError, so the one-line message names the file and the field."""
    if isinstance(value, ModelSpec):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a model spec string (see `cai models`), got {type(value).__name__}")
    try:
        return parse_spec(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None


# A config field holding a model spec parsed once, when the config loads; it serialises back to the string. For
# configs that are not hashed: run and experiment configs keep the string, which their step hashes include.
ModelSpecField = Annotated[ModelSpec, PlainValidator(parsed_spec), PlainSerializer(str, return_type=str)]


class ModelsConfig(Strict):
    """The two roles. ``feedback`` (critic, reviser, labeler, judge) defaults to ``policy``."""

    policy: str = "smollm2-135m"
    feedback: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "auto",
        description="auto | float32 | bfloat16 | float16 | int8 (CPU inference only: dynamic int8 Linear weights, "
        "~1.4x faster decoding, but on the 135M model every eval answer changes and the judged rates move). "
        "bfloat16 on a CPU with native bf16 (AVX512-BF16, AMX): ~1.8x faster decoding, but it flips enough greedy "
        "answers to change a comparison between trained checkpoints; slower than fp32 without native bf16. Compare "
        "figures only within one precision; eval metrics record it. Trainers always load their own copy.",
    )
    batch_size: int = Field(16, ge=1, description="generation batch size for in-process models")
    concurrency: int = Field(8, ge=1, description="parallel requests for openai: servers")

    @field_validator("policy", "feedback")
    @classmethod
    def _parsable(cls, spec: str | None) -> str | None:
        """A spec that cannot name a model fails when the config loads, not stages later. The config keeps the
        string (manifests hash and show it); backends parse it again where they load it."""
        if spec is not None:
            parsed_spec(spec)
        return spec

    @property
    def feedback_spec(self) -> str:
        return self.feedback or self.policy

    @property
    def weak_feedback(self) -> bool:
        """True when the feedback model is the small embedded default (or the policy itself)."""
        return self.feedback_spec.lower() in ("smollm2-135m", "smollm2-135m-instruct", "tiny-random") or (
            self.feedback is None or self.feedback == self.policy
        )


class PromptSourceConfig(Strict):
    """A prompt set: a bundled name (redteam, benign), a file, or hf:<dataset>."""

    source: str = "redteam"
    field: str | None = None
    split: str | None = "train"
    limit: int | None = Field(None, ge=1)


class BenignSourceConfig(PromptSourceConfig):
    """Benign prompts that only sound sensitive (helpfulness data, over-refusal checks)."""

    source: str = "benign"


class GenerationConfig(Strict):
    """How a model decodes: a run config's ``generation`` section (sampled by default) and, with greedy defaults
    (:class:`GreedyGenerationConfig`), an experiment's ``decode`` section."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.7, ge=0, description="0 = greedy (deterministic)")
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(CHAT_REPETITION_PENALTY, gt=0)
    stop: list[str] = Field(default_factory=list)

    def sampling(self, seed: int | None, max_new_tokens: int | None = None):
        """The backend's SamplingParams; ``max_new_tokens`` overrides the configured length."""
        from cai.backends import SamplingParams

        return SamplingParams(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=list(self.stop),
            seed=seed,
            repetition_penalty=self.repetition_penalty,
        )

    def step_config(self) -> dict[str, Any]:
        """The settings as an experiment step's config records them: ``stop`` only when set, so steps recorded
        before the experiments' ``decode`` section accepted ``stop`` keep their config hashes (and resume)."""
        return self.model_dump(exclude=set() if self.stop else {"stop"})


class GreedyGenerationConfig(GenerationConfig):
    """The same settings with greedy defaults, so experiment runs are reproducible. A subclass rather than other
    defaults at the use site: a partly written section (``decode: {max_new_tokens: 64}``) keeps greedy decoding."""

    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy (deterministic)")
    top_p: float = Field(1.0, gt=0, le=1)


def format_validation_error(source: str, exc: ValidationError) -> str:
    """First pydantic error as 'file: a.b.c: message (and N more)'."""
    errs = exc.errors()
    e = errs[0]
    loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; the bundled configs in cai/resources/configs/ show every key)"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif e["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")  # our validators' messages are whole sentences already
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a','b'], 3); the value is parsed as YAML."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set generation.max_new_tokens=64")
    key, value = item.split("=", 1)
    if not key.strip() or any(not k.strip() for k in key.split(".")):
        raise UserError(f"--set {item[:80]!r}: the key is empty; expected KEY=VALUE, e.g. --set seed=1")
    try:
        parsed = yaml.safe_load(value)
    except (yaml.YAMLError, RecursionError) as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise UserError(f"--set {item[:80]!r}: the value is {problem}; quote it, e.g. --set 'name=\"text\"'") from None
    return [k.strip() for k in key.split(".")], parsed


ConfigKind = Literal["run", "experiment"]
_BUNDLED_CONFIG_DIRS: dict[str, tuple[str, ...]] = {"run": ("configs",), "experiment": ("configs", "experiments")}


def _bundled_config_dir(kind: ConfigKind) -> Any:
    return resources.files("cai").joinpath("resources", *_BUNDLED_CONFIG_DIRS[kind])


def bundled_configs(kind: ConfigKind = "run") -> tuple[str, ...]:
    """Names of the configs shipped in the package (``quickstart``; ``backdoor``, ``unalign``, ...)."""
    return tuple(
        sorted(f.name.removesuffix(".yaml") for f in _bundled_config_dir(kind).iterdir() if f.name.endswith(".yaml"))
    )


def config_file(name_or_path: str | Path, kind: ConfigKind = "run") -> Path:
    """A bundled config by name (``cai run quickstart``), else a YAML file on disk; neither is a one-line error
    listing the bundled names."""
    names = bundled_configs(kind)
    if str(name_or_path) in names:
        return Path(str(_bundled_config_dir(kind).joinpath(f"{name_or_path}.yaml")))
    path = Path(name_or_path)
    if not path.is_file():
        what = "not a file" if path.exists() else "file not found"
        raise UserError(f"{path}: {what}, and not a bundled {kind} config (bundled: {', '.join(names)})")
    return path


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects duplicate mapping keys instead of silently keeping the last one (a config that
    sets a key twice says two things; which one the user meant is theirs to decide)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> Any:
    """Read a YAML file; malformed YAML, a duplicate key or non-UTF-8 text is a one-line error with the line
    number."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    except RecursionError:
        raise UserError(f"{path}: the YAML is nested too deeply to read; flatten it") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise UserError(f"{path}:{where}: {problem}; fix the YAML syntax") from None


M = TypeVar("M", bound=BaseModel)


def validate_yaml(cls: type[M], path: str | Path | None, overrides: Sequence[str] = ()) -> M:
    """Read a YAML file (or nothing, when ``path`` is None) into ``cls``, applying ``--set key.sub=value``
    overrides; every problem is a one-line UserError naming the file and the key."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        loaded = load_yaml(Path(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of config keys at the top level, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc)) from None
