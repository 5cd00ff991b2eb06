"""Tests for cai.data: bundled prompt sets and the file / HF loaders."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from cai.data import BUNDLED, Prompt, PromptSet, bundled_path, load_prompts, stable_id
from cai.errors import UserError

CATEGORIES = {"violence", "privacy", "racism", "sexism", "weapons_drugs", "self_harm", "fraud_cyber"}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---- bundled sets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "total", "per_cat", "n_eval", "prefix"),
    [("redteam", 259, 37, 105, "rt-"), ("benign", 133, 19, 56, "bn-")],
)
def test_bundled_sets(name: str, total: int, per_cat: int, n_eval: int, prefix: str) -> None:
    ps = load_prompts(name)
    assert len(ps) >= total and ps.skipped == []
    cats = Counter(p.category for p in ps)
    assert set(cats) == CATEGORIES
    assert min(cats.values()) >= per_cat
    ids = [p.id for p in ps]
    assert len(set(ids)) == len(ids) and all(i.startswith(prefix + p.category) for i, p in zip(ids, ps))
    assert {p.split for p in ps} == {"train", "eval"}
    assert len(ps.filter(split="eval")) >= n_eval  # enough held-out prompts for a 25-point drop to be significant
    for cat in CATEGORIES:  # about 60/40 inside every category
        in_cat = ps.filter(categories=[cat])
        share = len(in_cat.filter(split="eval")) / len(in_cat)
        assert 0.3 <= share <= 0.45
    assert all(p.source == "cai-lab-original" for p in ps)
    assert len({p.prompt for p in ps}) == len(ps)


def test_bundled_sets_are_disjoint_and_addressable() -> None:
    red = {p.prompt.lower() for p in load_prompts("redteam")}
    benign = {p.prompt.lower() for p in load_prompts("bundled:benign")}
    assert not red & benign
    assert BUNDLED == ("redteam", "benign")
    assert bundled_path("redteam").is_file()
    with pytest.raises(UserError, match="unknown bundled"):
        load_prompts("bundled:nope")


def test_bundled_split_and_limit() -> None:
    ev = load_prompts("redteam", split="eval")
    assert len(ev) > 0 and all(p.split == "eval" for p in ev)
    assert [p.id for p in load_prompts("redteam", limit=3)] == [p.id for p in load_prompts("redteam").prompts[:3]]


# ---- formats ------------------------------------------------------------------------------


def test_jsonl(tmp_path: Path) -> None:
    rows = [{"id": "x1", "prompt": "hello", "category": "c", "split": "eval"}, {"prompt": " hi "}]
    f = jsonl(tmp_path / "a.jsonl", rows)
    ps = load_prompts(f)
    assert isinstance(ps, PromptSet) and ps.source == str(f)
    assert ps.prompts[0] == Prompt(id="x1", prompt="hello", category="c", split="eval", source=str(f))
    assert ps.prompts[1].prompt == "hi" and ps.prompts[1].category == "unknown" and ps.prompts[1].split == "train"
    assert ps.prompts[0].to_dict() == dict(id="x1", prompt="hello", category="c", split="eval", source=str(f))
    assert [p.id for p in load_prompts(f, split="eval")] == ["x1"]


def test_json_strings_and_objects(tmp_path: Path) -> None:
    assert [p.prompt for p in load_prompts(write(tmp_path / "s.json", '["a", "b", ""]'))] == ["a", "b"]
    objs = load_prompts(write(tmp_path / "o.json", json.dumps([{"question": "q1"}, {"question": "q2"}])))
    assert [p.prompt for p in objs] == ["q1", "q2"]


def test_json_malformed_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"bad\.json is not valid JSON"):
        load_prompts(write(tmp_path / "bad.json", '["a", '))
    with pytest.raises(UserError, match="must hold a JSON list"):
        load_prompts(write(tmp_path / "obj.json", '{"prompt": "a"}'))


def test_csv(tmp_path: Path) -> None:
    f = write(tmp_path / "p.csv", 'id,goal,category\n1,"do, a thing",violence\n2,,privacy\n3,other,x\n')
    ps = load_prompts(f)
    assert [(p.id, p.prompt, p.category) for p in ps] == [("1", "do, a thing", "violence"), ("3", "other", "x")]
    assert ps.skipped == [{"line": 3, "reason": "empty prompt"}]


def test_txt(tmp_path: Path) -> None:
    ps = load_prompts(write(tmp_path / "p.txt", "first\n\n  \nsecond\n"))
    assert [p.prompt for p in ps] == ["first", "second"]
    assert ps.prompts[0].id == stable_id("first")


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unsupported extension '.xlsx'"):
        load_prompts(write(tmp_path / "p.xlsx", "x"))
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")


# ---- fields -------------------------------------------------------------------------------


def test_field_fallback_order(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [{"text": "t", "instruction": "i"}])
    assert load_prompts(f).prompts[0].prompt == "t"
    assert load_prompts(f, field="instruction").prompts[0].prompt == "i"
    g = jsonl(tmp_path / "b.jsonl", [{"Behavior": "b"}])
    assert load_prompts(g).prompts[0].prompt == "b"


def test_missing_field_error_names_file_field_and_fields(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [{"a": "1", "b": "2"}])
    with pytest.raises(UserError) as e:
        load_prompts(f, field="x")
    msg = str(e.value)
    assert str(f) in msg and "has no field 'x'" in msg and "fields present: a, b" in msg and "--field" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="no prompt field.*fields present: a, b"):
        load_prompts(f)


def test_record_missing_field_is_skipped(tmp_path: Path) -> None:
    ps = load_prompts(jsonl(tmp_path / "a.jsonl", [{"prompt": "ok"}, {"other": "no"}, {"prompt": 3}]))
    assert len(ps) == 1
    assert ps.skipped == [
        {"line": 2, "reason": "missing field 'prompt'"},
        {"line": 3, "reason": "field 'prompt' is not text"},
    ]


def test_custom_id_and_category_fields(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [{"uid": 7, "prompt": "p", "topic": "t"}])
    ps = load_prompts(f, id_field="uid", category_field="topic")
    assert (ps.prompts[0].id, ps.prompts[0].category) == ("7", "t")


# ---- per-line and fatal problems ----------------------------------------------------------


def test_malformed_line_is_skipped(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", '{"prompt": "a"}\n{"prompt": oops\n\n{"prompt": "b"}\n')
    ps = load_prompts(f)
    assert [p.prompt for p in ps] == ["a", "b"]
    assert len(ps.skipped) == 1 and ps.skipped[0]["line"] == 2 and "malformed JSON" in ps.skipped[0]["reason"]


def test_non_utf8_file(tmp_path: Path) -> None:
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt is not UTF-8 text; re-save it as UTF-8"):
        load_prompts(f)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "bom.csv"
    f.write_bytes("\ufeffprompt\nhello\n".encode("utf-8"))
    assert load_prompts(f).prompts[0].prompt == "hello"


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv", "e.txt"])
def test_empty_file_is_an_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="contains no prompts"):
        load_prompts(write(tmp_path / name, ""))


def test_only_bad_lines_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="contains no prompts .*malformed JSON"):
        load_prompts(write(tmp_path / "a.jsonl", "not json\n"))


def test_split_with_no_match_is_an_error(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "split": "train"}])
    with pytest.raises(UserError, match="no prompts with split 'evl'; splits present: train"):
        load_prompts(f, split="evl")


# ---- ids ----------------------------------------------------------------------------------


def test_stable_ids(tmp_path: Path) -> None:
    a = load_prompts(write(tmp_path / "a.txt", "same prompt\nother\n"))
    b = load_prompts(jsonl(tmp_path / "b.jsonl", [{"prompt": "other"}, {"prompt": "same prompt"}]))
    assert a.prompts[0].id == b.prompts[1].id == stable_id("same prompt")
    assert a.prompts[0].id.startswith("p-") and len(a.prompts[0].id) == 14


def test_duplicate_ids_keep_first(tmp_path: Path) -> None:
    ps = load_prompts(jsonl(tmp_path / "a.jsonl", [{"id": "d", "prompt": "one"}, {"id": "d", "prompt": "two"}]))
    assert [p.prompt for p in ps] == ["one"]
    assert ps.skipped == [{"line": 2, "reason": "duplicate id 'd' (first on line 1)"}]
    txt = load_prompts(write(tmp_path / "dup.txt", "x\nx\n"))
    assert len(txt) == 1 and "duplicate id" in txt.skipped[0]["reason"]


# ---- Hugging Face datasets (no network: load_dataset is replaced) --------------------------


def fake_datasets(monkeypatch: pytest.MonkeyPatch, fn) -> list:
    calls: list = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return fn()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_datasets(monkeypatch, lambda: [{"goal": "g1"}, {"goal": "g2"}])
    ps = load_prompts("hf:org/set:cfg@test")
    assert calls == [("org/set", "cfg", "test")]
    assert [p.prompt for p in ps] == ["g1", "g2"] and ps.source == "hf:org/set:cfg@test"
    load_prompts("hf:org/set")
    assert calls[-1] == ("org/set", None, "train")


def test_hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom():
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, boom)
    with pytest.raises(UserError, match="Hub is unreachable.*local"):
        load_prompts("hf:org/set")


def test_hf_other_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom():
        raise ValueError("Unknown split 'tset'")

    fake_datasets(monkeypatch, boom)
    with pytest.raises(UserError, match="could not load hf:org/set@tset .*check the dataset name"):
        load_prompts("hf:org/set@tset")


def test_split_without_split_field_labels_all(tmp_path: Path) -> None:
    ps = load_prompts(write(tmp_path / "p.txt", "a\nb\n"), split="eval")
    assert [p.split for p in ps] == ["eval", "eval"]
    assert [p.split for p in load_prompts(tmp_path / "p.txt")] == ["train", "train"]


def test_jsonl_and_txt_lines_split_only_on_newlines(tmp_path: Path) -> None:
    """Issue 13: str.splitlines also splits on U+2028/U+2029/U+0085/\\v/\\f, which are legal inside a JSON string
    or a prompt: records were dropped as malformed and later line numbers were wrong."""
    p = tmp_path / "p.jsonl"
    rows = [{"prompt": "a\u2028b"}, {"prompt": "c\u0085d\u2029e"}, {"prompt": "f\x0bg\x0ch"}]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n{bad\n" + '{"prompt": "z"}\n',
                 encoding="utf-8")
    ps = load_prompts(str(p))
    assert [x.prompt for x in ps] == ["a\u2028b", "c\u0085d\u2029e", "f\x0bg\x0ch", "z"]
    assert [s["line"] for s in ps.skipped] == [4]
    t = tmp_path / "p.txt"
    t.write_text("one\u2028still one\r\ntwo\rthree\n", encoding="utf-8")
    assert [x.prompt for x in load_prompts(str(t))] == ["one\u2028still one", "two", "three"]
