"""Constitutions: the principles that drive critique, revision, preference labels and classification.

A constitution is a YAML file validated by the pydantic models below (unknown keys are errors).
Every validation problem becomes a one-line :class:`cai.errors.UserError` naming the file, the
field path and what was expected. See docs/constitution.md for the schema.
"""

from __future__ import annotations

import string
import types
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from cai.base_config import UniqueKeyLoader
from cai.errors import UserError

__all__ = [
    "BUNDLED_CONSTITUTIONS",
    "CATEGORIES",
    "Constitution",
    "ConstitutionInverse",
    "Demonstration",
    "DemonstrationInverse",
    "Principle",
    "PrincipleInverse",
    "constitution_summary",
    "dump_constitution",
    "invert_constitution",
    "load_constitution",
    "parse_constitution",
]

BUNDLED_CONSTITUTIONS: tuple[str, ...] = ("harmless", "inverted", "contextual")

Category = Literal["violence", "privacy", "racism", "sexism", "weapons_drugs", "self_harm", "fraud_cyber"]
CATEGORIES: tuple[str, ...] = get_args(Category)
"""The red-team prompt categories used across the project."""

Id = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _FieldProblem(ValueError):
    """A cross-field problem found by a model validator, with the field path it concerns."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


class PrincipleInverse(_Strict):
    """The opposite of a principle, used by :func:`invert_constitution`."""

    name: Id = Field(description="a snake_case id, unique among inverses")
    label: Text = Field(description="a short phrase naming the topic")
    critique: Text = Field(description="a critique request string")
    revision: Text = Field(description="a revision request string")
    preference: Text = Field(description="a pairwise preference question")


class Principle(_Strict):
    """One principle: a label for classification, critique/revision requests and a preference question."""

    name: Id = Field(description="a snake_case id, unique in the constitution")
    label: Text = Field(description="a short phrase naming the topic, scored by the classifier")
    categories: list[Category] = Field(default_factory=list, description="red-team categories this principle probes")
    critique: Text = Field(description="a critique request string")
    revision: Text = Field(description="a revision request string")
    preference: Text = Field(description="a pairwise preference question")
    inverse: PrincipleInverse | None = Field(default=None, description="the opposite principle")


class DemonstrationInverse(_Strict):
    """The same demonstration under the inverse principle (same prompt)."""

    response: Text = Field(description="the first assistant answer")
    critique: Text = Field(description="the example critique text")
    revision: Text = Field(description="the revised answer")


class Demonstration(_Strict):
    """A worked few-shot example: prompt, flawed answer, critique under one principle, revision."""

    principle: Id = Field(description="the name of a principle in this constitution")
    prompt: Text = Field(description="the user turn")
    response: Text = Field(description="the first (flawed) assistant answer")
    critique: Text = Field(description="the example critique text")
    revision: Text = Field(description="the revised answer")
    inverse: DemonstrationInverse | None = Field(default=None, description="the demonstration under the inverse")


class ConstitutionInverse(_Strict):
    """Top-level fields of the inverted constitution (optional; derived when absent)."""

    name: Id = Field(description="a snake_case name for the inverted constitution")
    description: Text = Field(description="one paragraph")
    system_prompt: Text = Field(description="the inverted system prompt")
    refusal_style: Text = Field(description="how the inverted assistant declines; may contain {topic}")


class Constitution(_Strict):
    """A named set of principles plus the prompts and demonstrations that go with them."""

    name: Id = Field(description="a snake_case name")
    description: Text = Field(description="one paragraph")
    system_prompt: Text = Field(description="the system prompt for the policy")
    refusal_style: Text = Field(description="how to decline; may contain {topic}")
    principles: list[Principle] = Field(description="a list of at least one principle")
    demonstrations: list[Demonstration] = Field(default_factory=list, description="a list of demonstrations")
    inverse: ConstitutionInverse | None = Field(default=None, description="top-level fields of the inverse")
    inverted_from: Id | None = Field(default=None, description="the name of the source constitution, or null")

    @model_validator(mode="after")
    def _check_references(self) -> Constitution:
        if not self.principles:
            raise _FieldProblem("principles", "no principles defined (at least one is required)")
        _check_unique([p.name for p in self.principles], "name")
        _check_unique([p.inverse.name if p.inverse else None for p in self.principles], "inverse.name")
        known = [p.name for p in self.principles]
        for i, d in enumerate(self.demonstrations):
            if d.principle not in known:
                raise _FieldProblem(
                    f"demonstrations[{i}].principle",
                    f"unknown principle {d.principle!r} (expected one of: {', '.join(known)})",
                )
        _check_placeholders(self.refusal_style, "refusal_style")
        if self.inverse:
            _check_placeholders(self.inverse.refusal_style, "inverse.refusal_style")
        return self

    def principle(self, name: str) -> Principle:
        """The principle called ``name``; UserError naming the known names otherwise."""
        for p in self.principles:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.principles)
        raise UserError(f"constitution {self.name!r} has no principle {name!r} (known: {known})")

    def principles_for_category(self, category: str) -> list[Principle]:
        """Principles whose ``categories`` include ``category`` (empty for unknown categories)."""
        return [p for p in self.principles if category in p.categories]

    @property
    def invertible(self) -> bool:
        """True when every principle has an ``inverse``."""
        return all(p.inverse is not None for p in self.principles)


def _check_unique(names: list[str | None], key: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is not None and name in seen:
            raise _FieldProblem(f"principles[{i}].{key}", f"duplicate name {name!r} (also principles[{seen[name]}])")
        if name is not None:
            seen[name] = i


def _check_placeholders(text: str, path: str) -> None:
    fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None and f != "topic"]
    if fields:
        raise _FieldProblem(
            path, f"unknown placeholder {{{fields[0]}}} (only {{topic}} is allowed; write {{{{ or }}}} for braces)"
        )


# ---------------------------------------------------------------------------------------------
# Loading


def _bundled_path(name: str) -> Any:
    return resources.files("cai").joinpath("resources", "constitutions", f"{name}.yaml")


def load_constitution(name_or_path: str | Path) -> Constitution:
    """Load a bundled constitution by name (see BUNDLED_CONSTITUTIONS) or a YAML file by path."""
    if isinstance(name_or_path, str) and name_or_path in BUNDLED_CONSTITUTIONS:
        source = _bundled_path(name_or_path)
    else:
        source = Path(name_or_path)
        if not source.is_file():
            what = "not a file" if source.exists() else "no such file"
            raise UserError(
                f"{source}: {what}, and not a bundled constitution (bundled: {', '.join(BUNDLED_CONSTITUTIONS)})"
            )
    try:
        text = source.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: not UTF-8 text (byte {exc.start}); re-save the constitution as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    return parse_constitution(text, str(source))


def parse_constitution(text: str, source: str = "<string>") -> Constitution:
    """Validate YAML ``text``; ``source`` names the file in error messages."""
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise UserError(f"{where}: malformed YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{source}: malformed YAML: {e}") from None
    except RecursionError:
        raise UserError(f"{source}: the YAML is nested too deeply to read") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise UserError(
            f"{source}: expected a mapping (name, description, principles, ...) at the top level, got {got}"
        )
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    """One line for the first error: ``field.path: problem (expectation)`` plus ``(and N more)``."""
    errors = e.errors()
    err = errors[0]
    loc = tuple(err["loc"])
    problem = (err.get("ctx") or {}).get("error")
    if isinstance(problem, _FieldProblem):
        line = f"{problem.path}: {problem.message}"
    else:
        parent, field = _walk(loc)
        path = _format_loc(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(parent.model_fields) if parent else "?"
            line = f"{path}: unknown key (expected one of: {allowed})"
        else:
            msg = "field required" if err["type"] == "missing" else err["msg"][:1].lower() + err["msg"][1:]
            line = f"{path}: {msg}" + (f" ({field.description})" if field and field.description else "")
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _walk(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """The model holding the last named field of ``loc``, and that field's FieldInfo (or None)."""
    model: type[BaseModel] | None = Constitution
    parent, field = model, None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return model, None
        parent, field = model, model.model_fields[part]
        model = _inner_model(field.annotation)
    return parent, field


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, Union, types.UnionType):
        for arg in get_args(annotation):
            if (found := _inner_model(arg)) is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------
# Inversion, dumping, summary


def invert_constitution(c: Constitution) -> Constitution:
    """Swap every principle for its inverse (and back: inverting twice gives the original).

    Demonstrations with an ``inverse`` block are swapped; those without are dropped with a
    ``UserWarning`` giving the count. UserError if a principle has no ``inverse``.
    """
    missing = [p.name for p in c.principles if p.inverse is None]
    if missing:
        raise UserError(
            f"constitution {c.name!r} is not invertible: principles without an inverse: {', '.join(missing)}"
        )
    principles = []
    for p in c.principles:
        inv = p.inverse
        assert inv is not None
        back = PrincipleInverse(**p.model_dump(include={"name", "label", "critique", "revision", "preference"}))
        principles.append(Principle(**inv.model_dump(), categories=list(p.categories), inverse=back))
    renamed = {p.name: p.inverse.name for p in c.principles if p.inverse}
    demos = [
        Demonstration(
            principle=renamed[d.principle],
            prompt=d.prompt,
            response=d.inverse.response,
            critique=d.inverse.critique,
            revision=d.inverse.revision,
            inverse=DemonstrationInverse(response=d.response, critique=d.critique, revision=d.revision),
        )
        for d in c.demonstrations
        if d.inverse is not None
    ]
    dropped = len(c.demonstrations) - len(demos)
    if dropped:
        warnings.warn(
            f"inverting {c.name!r}: dropped {dropped} demonstration(s) without an inverse block", stacklevel=2
        )
    top = c.inverse or ConstitutionInverse(
        name=f"{c.name}_inverted",
        description=f"The inverse of the {c.name!r} constitution: every principle swapped for its opposite.",
        system_prompt=c.system_prompt,
        refusal_style=c.refusal_style,
    )
    back_top = ConstitutionInverse(**c.model_dump(include={"name", "description", "system_prompt", "refusal_style"}))
    return Constitution(
        **top.model_dump(),
        principles=principles,
        demonstrations=demos,
        inverse=back_top,
        inverted_from=None if c.inverted_from else c.name,
    )


class _Dumper(yaml.SafeDumper):
    """Writes long strings as folded block scalars (``>-``), like the hand-written files."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = ">" if len(value) > 80 and "\n" not in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_constitution(c: Constitution, header: str | None = None) -> str:
    """YAML text for ``c`` (null fields left out) that :func:`parse_constitution` reads back equal."""
    data = c.model_dump(mode="json", exclude_none=True)
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=96)
    return (f"# {header}\n" if header else "") + body


def constitution_summary(c: Constitution) -> dict[str, Any]:
    """Plain data for the CLI's ``check``: counts, one row per principle, uncovered categories."""
    covered = {cat for p in c.principles for cat in p.categories}
    return {
        "name": c.name,
        "description": c.description,
        "inverted_from": c.inverted_from,
        "n_principles": len(c.principles),
        "n_demonstrations": len(c.demonstrations),
        "invertible": c.invertible,
        "principles": [
            {
                "name": p.name,
                "label": p.label,
                "categories": list(p.categories),
                "inverse": p.inverse.name if p.inverse else None,
            }
            for p in c.principles
        ],
        "uncovered_categories": [cat for cat in CATEGORIES if cat not in covered],
    }
