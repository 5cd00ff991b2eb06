"""Property-based fuzzing of everything that reads user files: the prompt readers (JSONL, JSON, CSV, TXT), the
run artifacts (JSONL), YAML, run configs, `--set` overrides, guard configs and constitutions.

The contract (DESIGN.md): any input gives a result or a one-line :class:`UserError`; never a traceback, never
a lost record. The budget is the "ci" Hypothesis profile of conftest.py (60 examples a test, derandomized, so
every run tries the same inputs); ``HYPOTHESIS_PROFILE=deep`` tries many more.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from cai.data import load_prompts  # noqa: E402
from cai.errors import UserError  # noqa: E402

# text with the characters that break naive readers: line and paragraph separators, NEL, \v, \f, \r, quotes, BOM
TRICKY = st.sampled_from(["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\r", "\n", "\r\n", '"', ",", "\ufeff",
                          "\x00", "\t", "{", "}", "\\", "é", "😀"])
UNICODE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)  # any text that is valid Unicode
TEXT = st.lists(st.one_of(UNICODE, TRICKY), max_size=8).map("".join)
LINE_TEXT = TEXT.map(lambda t: t.replace("\r", " ").replace("\n", " "))  # what one line of a text file can hold


def one_line_error(exc: UserError) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg


_TMP = tempfile.TemporaryDirectory(prefix="cai-fuzz-")  # removed when the test process ends
_count = iter(range(10**9))


def _file(suffix: str, data: bytes) -> Path:
    path = Path(_TMP.name) / f"input{next(_count)}{suffix}"
    path.write_bytes(data)
    return path


def _load_or_user_error(path: Path, **kw):
    try:
        return load_prompts(str(path), **kw)
    except UserError as exc:
        one_line_error(exc)
        return None


# ---- prompt readers: arbitrary bytes ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
@given(data=st.one_of(st.binary(max_size=300), TEXT.map(lambda t: t.encode())))
def test_any_bytes_give_prompts_or_one_line_error(suffix, data):
    ps = _load_or_user_error(_file(suffix, data))
    if ps is not None:
        assert len(ps) > 0 and all(p.prompt == p.prompt.strip() and p.prompt for p in ps)
        assert len({p.id for p in ps}) == len(ps)


# ---- prompt readers: valid records are never lost ------------------------------------------------------------
RECORD_TEXT = TEXT.filter(lambda t: t.strip() != "")


@given(texts=st.lists(RECORD_TEXT, min_size=1, max_size=8, unique_by=lambda t: t.strip()),
       junk=st.lists(st.tuples(st.integers(0, 8), st.sampled_from(["{", "not json", '{"prompt": ', "]"])), max_size=3),
       newline=st.sampled_from(["\n", "\r\n"]))
def test_jsonl_keeps_every_valid_record_and_numbers_bad_lines(texts, junk, newline):
    lines = [(True, json.dumps({"prompt": t}, ensure_ascii=False)) for t in texts]
    for at, bad in sorted(junk, reverse=True):
        lines.insert(min(at, len(lines)), (False, bad))
    ps = load_prompts(str(_file(".jsonl", newline.join(line for _, line in lines).encode())))
    assert [p.prompt for p in ps] == [t.strip() for t in texts]
    assert [s["line"] for s in ps.skipped] == [n for n, (good, _) in enumerate(lines, 1) if not good]


@given(texts=st.lists(RECORD_TEXT.filter(lambda t: "\x00" not in t), min_size=1, max_size=8,
                      unique_by=lambda t: t.strip()))
def test_csv_keeps_every_row(texts):
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["prompt", "category"])
    for t in texts:
        w.writerow([t, "c"])
    ps = load_prompts(str(_file(".csv", buf.getvalue().encode())))
    assert [p.prompt for p in ps] == [t.strip() for t in texts]
    assert all(p.category == "c" for p in ps)


@given(texts=st.lists(LINE_TEXT.filter(lambda t: t.strip() != "" and not t.startswith("\ufeff")), min_size=1, max_size=8,
                      unique_by=lambda t: t.strip()))
def test_txt_keeps_every_line(texts):
    ps = load_prompts(str(_file(".txt", "\n".join(texts).encode())))
    assert [p.prompt for p in ps] == [t.strip() for t in texts]


@given(texts=st.lists(RECORD_TEXT, min_size=1, max_size=8, unique_by=lambda t: t.strip()))
def test_json_list_keeps_every_item(texts):
    ps = load_prompts(str(_file(".json", json.dumps(texts, ensure_ascii=False).encode())))
    assert [p.prompt for p in ps] == [t.strip() for t in texts]


# ---- run artifacts ----------------------------------------------------------------------------------------------
@given(values=st.lists(TEXT, min_size=1, max_size=10))
def test_jsonl_artifact_round_trip_loses_nothing(values):
    from cai.runs import JsonlWriter, read_jsonl

    path = _file(".jsonl", b"")
    with JsonlWriter(path) as w:
        for i, v in enumerate(values):
            w.write({"id": f"r{i}", "text": v})
    assert [r["text"] for r in read_jsonl(path)] == values
    with JsonlWriter(path) as w:  # resume: everything is already there
        assert len(w.done) == len(values)


@given(data=st.binary(max_size=300))
def test_jsonl_artifact_reader_never_crashes(data):
    from cai.runs import read_jsonl

    try:
        out = read_jsonl(_file(".jsonl", data), repair=True)
    except UserError as exc:
        one_line_error(exc)
    else:
        assert isinstance(out, list)


# ---- YAML, run configs, overrides, guard configs, constitutions -----------------------------------------------
YAML_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                        st.text(max_size=12))
YAML_VALUE = st.recursive(YAML_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
RUN_KEYS = ["name", "seed", "runs_dir", "models", "constitution", "prompts", "benign", "generation", "stages",
            "critique", "sft", "preferences", "reward", "rl", "dpo", "eval", "classify"]
CONFIGISH = st.dictionaries(st.one_of(st.sampled_from(RUN_KEYS), st.text(max_size=8)), YAML_VALUE, max_size=5)
YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["a: 1", "- x", "  b: [", "]", "{", "}", "!!python/object:os.system", "&a x", "*a",
                              "? k", ": v", "'q", '"\\x"', "%YAML 1.1", "---", "...", "[" * 40, "seed: 1e400",
                              "seed: 99999999999999999999999", "models: {policy: 3}", "stages: [nope]",
                              "name: ../x", "\t- tab"]), max_size=8).map("\n".join),
)


def _yaml_file(text: str) -> Path:
    return _file(".yaml", text.encode())


@given(text=YAML_TEXT)
def test_run_config_from_any_yaml_text(text):
    from cai.config import RunConfig, load_config

    try:
        assert isinstance(load_config(_yaml_file(text)), RunConfig)
    except UserError as exc:
        one_line_error(exc)


@given(data=CONFIGISH)
def test_run_config_from_any_yaml_structure(data):
    import yaml

    from cai.config import RunConfig, load_config

    try:
        assert isinstance(load_config(_yaml_file(yaml.safe_dump(data, allow_unicode=True))), RunConfig)
    except UserError as exc:
        one_line_error(exc)


@given(items=st.lists(st.one_of(
    st.tuples(st.sampled_from(RUN_KEYS + ["generation.max_new_tokens", "models.policy", "seed", "a.b.c"]),
              st.one_of(st.text(max_size=12), st.sampled_from(["[1, 2", "{a: 1}", "1e999", "-1", "null", "~",
                                                                "2**70", "1180591620717411303424"])))
    .map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=20)), max_size=4))
def test_set_overrides_never_crash(items):
    from cai.config import RunConfig, load_config

    try:
        assert isinstance(load_config(None, items), RunConfig)
    except UserError as exc:
        one_line_error(exc)


@given(text=YAML_TEXT)
def test_guard_config_from_any_yaml(text):
    from cai.guard.config import GuardConfig, load_guard_config

    try:
        assert isinstance(load_guard_config(_yaml_file(text), {}), GuardConfig)
    except UserError as exc:
        one_line_error(exc)


@given(text=st.one_of(YAML_TEXT, st.dictionaries(st.sampled_from(
    ["name", "description", "system_prompt", "refusal_style", "principles", "x"]), YAML_VALUE, max_size=6)
    .map(lambda d: __import__("yaml").safe_dump(d, allow_unicode=True))))
def test_constitution_from_any_yaml(text):
    from cai.constitution import Constitution, load_constitution

    try:
        assert isinstance(load_constitution(str(_yaml_file(text))), Constitution)
    except UserError as exc:
        one_line_error(exc)
