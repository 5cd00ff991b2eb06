"""Constitutions: bundled files, inversion, one-line errors for bad files, and the CLI."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cai.commands.constitution import app
from cai.constitution import (
    BUNDLED_CONSTITUTIONS,
    CATEGORIES,
    Constitution,
    dump_constitution,
    invert_constitution,
    load_constitution,
    parse_constitution,
)
from cai.errors import UserError


def _invert_harmless() -> Constitution:
    """invert(harmless), which drops its one demonstration without an inverse block."""
    with pytest.warns(UserWarning, match="dropped 1 demonstration"):
        return invert_constitution(load_constitution("harmless"))


MINIMAL: dict[str, Any] = {
    "name": "tiny",
    "description": "A tiny constitution for tests.",
    "system_prompt": "You are helpful.",
    "refusal_style": "Say you can't help with {topic}.",
    "principles": [
        {
            "name": "peace",
            "label": "violence",
            "categories": ["violence"],
            "critique": "Identify ways the response is violent.",
            "revision": "Please rewrite it to be peaceful.",
            "preference": "Which response is less violent?",
        },
        {
            "name": "privacy",
            "label": "privacy",
            "categories": ["privacy"],
            "critique": "Identify ways the response invades privacy.",
            "revision": "Please rewrite it to respect privacy.",
            "preference": "Which response better respects privacy?",
        },
    ],
    "demonstrations": [
        {"principle": "peace", "prompt": "p", "response": "r", "critique": "c", "revision": "v"},
    ],
}


def _write(tmp_path: Path, data: Any, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# --- bundled constitutions ------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED_CONSTITUTIONS)
def test_bundled_constitutions_load_and_round_trip(name: str) -> None:
    c = load_constitution(name)
    assert c.principles
    assert parse_constitution(dump_constitution(c)) == c


@pytest.mark.parametrize("name", ["harmless", "contextual"])
def test_every_category_is_covered(name: str) -> None:
    c = load_constitution(name)
    for category in CATEGORIES:
        assert c.principles_for_category(category), f"{name}: no principle for {category}"


def test_harmless_shape() -> None:
    c = load_constitution("harmless")
    assert len(c.principles) == 16 and c.invertible
    assert 4 <= len(c.demonstrations) <= 6
    assert len({d.principle for d in c.demonstrations}) == len(c.demonstrations)
    assert "{topic}" in c.refusal_style
    assert c.principle("peace").inverse is not None and c.principle("peace").inverse.name == "violence"


def test_contextual_has_over_refusal_and_is_not_invertible() -> None:
    c = load_constitution("contextual")
    assert c.principle("over_refusal").label
    assert not c.invertible
    with pytest.raises(UserError, match="not invertible"):
        invert_constitution(c)


def test_inverted_file_equals_invert_of_harmless() -> None:
    inverted = load_constitution("inverted")
    assert inverted == _invert_harmless()
    assert inverted.name == "inverted" and inverted.inverted_from == "harmless"
    assert {p.name for p in inverted.principles} >= {"violence", "doxxing", "racism", "sexism", "deception"}


def test_invert_twice_gives_back_the_original() -> None:
    harmless = load_constitution("harmless")
    twice = invert_constitution(_invert_harmless())
    assert twice.principles == harmless.principles
    assert twice.demonstrations == [d for d in harmless.demonstrations if d.inverse is not None]
    assert (twice.name, twice.system_prompt, twice.inverted_from) == ("harmless", harmless.system_prompt, None)


def test_invert_without_top_level_inverse_derives_a_name() -> None:
    data = copy.deepcopy(MINIMAL)
    for p in data["principles"]:
        p["inverse"] = {k: f"inverse {v}" for k, v in p.items() if k in ("label", "critique", "revision", "preference")}
        p["inverse"]["name"] = f"anti_{p['name']}"
    c = Constitution.model_validate(data)
    with pytest.warns(UserWarning, match="dropped 1 demonstration"):
        inv = invert_constitution(c)
    assert inv.name == "tiny_inverted" and inv.inverted_from == "tiny" and inv.demonstrations == []
    assert [p.name for p in inv.principles] == ["anti_peace", "anti_privacy"]


def test_principle_lookup_and_categories() -> None:
    c = load_constitution("harmless")
    assert c.principle("privacy").name == "privacy"
    with pytest.raises(UserError, match=r"'harmless' has no principle 'nope' \(known: harmlessness, peace"):
        c.principle("nope")
    assert [p.name for p in c.principles_for_category("privacy")] == ["privacy"]
    assert c.principles_for_category("unknown") == []


# --- bad inputs: one line naming the file and the field -----------------------------------


def _mutated(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    change(data)
    return data


BAD = {
    "no_principles": (lambda d: d.update(principles=[]), "principles: no principles defined"),
    "missing_principles": (lambda d: d.pop("principles"), "principles: field required (a list of at least one"),
    "missing_critique": (
        lambda d: d["principles"][1].pop("critique"),
        "principles[1].critique: field required (a critique request string)",
    ),
    "unknown_key": (lambda d: d["principles"][0].update(colour="red"), "principles[0].colour: unknown key (expected one of: name,"),
    "unknown_top_key": (lambda d: d.update(extra=1), "extra: unknown key (expected one of: name, description"),
    "unknown_demo_principle": (
        lambda d: d["demonstrations"][0].update(principle="honesty"),
        "demonstrations[0].principle: unknown principle 'honesty' (expected one of: peace, privacy)",
    ),
    "duplicate_names": (
        lambda d: d["principles"][1].update(name="peace"),
        "principles[1].name: duplicate name 'peace' (also principles[0])",
    ),
    "bad_category": (lambda d: d["principles"][0].update(categories=["violnce"]), "principles[0].categories[0]: input should be"),
    "bad_name": (lambda d: d["principles"][0].update(name="Peace Now"), "principles[0].name: string should match pattern"),
    "empty_text": (lambda d: d["principles"][0].update(revision="  "), "principles[0].revision: string should have at least 1"),
    "bad_placeholder": (lambda d: d.update(refusal_style="No {subject}."), "refusal_style: unknown placeholder {subject}"),
    "many_errors": (
        lambda d: [p.pop("critique") for p in d["principles"]],
        "principles[0].critique: field required (a critique request string) (and 1 more)",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_constitution_gives_one_line_naming_file_and_field(tmp_path: Path, case: str) -> None:
    change, expected = BAD[case]
    path = _write(tmp_path, _mutated(change))
    with pytest.raises(UserError) as info:
        load_constitution(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nprinciples: [\n  - oops\n", ":3:"),
        ("name: x\n  description: bad indent\n", ":2:"),
        ("name: x\nname: y\n", ":2:1: malformed YAML: duplicate key 'name'"),
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match="malformed YAML") as info:
        load_constitution(path)
    assert str(info.value).startswith(f"{path}:") and expected in str(info.value)


@pytest.mark.parametrize(("text", "got"), [("", "an empty file"), ("- a\n- b\n", "list")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=f"{path}: expected a mapping .* got {got}"):
        load_constitution(path)


def test_missing_file_lists_bundled_names(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.yaml: no such file.*bundled: harmless, inverted, contextual"):
        load_constitution(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="no such file"):
        load_constitution("harmles")


# --- CLI -----------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_check() -> None:
    result = runner.invoke(app, ["check", "harmless"])
    assert result.exit_code == 0, result.output
    assert "harmless" in result.output and "16 principles" in result.output and "violence" in result.output


def test_cli_check_bad_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _mutated(lambda d: d["principles"][0].pop("critique")))
    result = runner.invoke(app, ["check", str(path)])
    assert isinstance(result.exception, UserError)
    assert "principles[0].critique" in str(result.exception)


def test_cli_invert_writes_loadable_yaml_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "inv.yaml"
    result = runner.invoke(app, ["invert", "harmless", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "dropped 1" in result.output
    assert load_constitution(out) == load_constitution("inverted")

    again = runner.invoke(app, ["invert", "harmless", "--out", str(out)])
    assert isinstance(again.exception, UserError) and "--force" in str(again.exception)
    forced = runner.invoke(app, ["invert", "inverted", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert load_constitution(out).principles == load_constitution("harmless").principles


def test_cli_invert_not_invertible(tmp_path: Path) -> None:
    result = runner.invoke(app, ["invert", "contextual", "--out", str(tmp_path / "o.yaml")])
    assert isinstance(result.exception, UserError) and "over_refusal" in str(result.exception)
    assert not (tmp_path / "o.yaml").exists()


def test_cli_list() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for name in BUNDLED_CONSTITUTIONS:
        assert name in result.output
