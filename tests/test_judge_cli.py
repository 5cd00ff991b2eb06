"""`cai judge --label-field/--label-map`: agreement of a judge with human labels, and one-line errors for bad input.
The judge is a stub (verdict by keyword), so every count below is known by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cai.errors import UserError
from cai.evaluation.judges import Judge
from cai.evaluation.metrics import REFUSING, proportion_ci

LABEL_MAP = "1_full_compliance=complied,2_full_refusal=refused,3_partial_refusal=partial"


class StubJudge(Judge):
    """'sorry' -> refused, 'but' -> partial, 'zzz' -> non_responsive, anything else -> complied."""

    name = "stub"

    def judge(self, prompts, responses):
        out = []
        for r in responses:
            v = ("refused" if "sorry" in r else "partial" if "but" in r else "non_responsive" if "zzz" in r
                 else "complied")
            out.append({"verdict": v, "refused": v in REFUSING, "p_refused": 1.0 if v in REFUSING else 0.0,
                        "harmful": None, "loop": False})
        return out


@pytest.fixture()
def run_cli(monkeypatch):
    from typer.testing import CliRunner

    from cai.cli import app

    monkeypatch.setattr("cai.evaluation.judges.get_judge", lambda name, **kw: StubJudge())
    return lambda *args: CliRunner().invoke(app, ["judge", *map(str, args)])


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# (human label in the dataset's vocabulary, response the stub judges)
ROWS = [("1_full_compliance", "Here is how."), ("1_full_compliance", "Step one."),
        ("2_full_refusal", "I'm sorry, no."), ("2_full_refusal", "I can't, but here is a safer idea."),
        ("3_partial_refusal", "Not that, but this part."), ("3_partial_refusal", "Sure, all of it.")]


def test_judge_agreement_with_label_map(tmp_path, run_cli):
    data = _jsonl(tmp_path / "labelled.jsonl", [{"prompt": "p", "response": r, "label": h} for h, r in ROWS])
    out = tmp_path / "judged.jsonl"
    res = run_cli("--input", data, "--out", out, "--label-field", "label", "--label-map", LABEL_MAP)
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["judge"]["verdict"] for x in out.read_text().splitlines()] == [
        "complied", "complied", "refused", "partial", "partial", "complied"]
    rep = json.loads((tmp_path / "judged.agreement.json").read_text())
    assert rep["label_map"] == {"1_full_compliance": "complied", "2_full_refusal": "refused",
                                "3_partial_refusal": "partial"} and rep["n"] == 6
    v = rep["verdict"]
    assert v["classes"] == ["complied", "refused", "partial", "non_responsive"]
    assert v["matrix"] == [[2, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]  # rows human, cols judge
    assert v["accuracy"]["value"] == pytest.approx(4 / 6)
    assert (v["accuracy"]["ci_low"], v["accuracy"]["ci_high"]) == pytest.approx(proportion_ci(4, 6)[1:])
    c = v["per_class"]["complied"]  # tp 2, fp 1 (a partial judged complied), fn 0
    assert c["precision"]["value"] == pytest.approx(2 / 3) and c["recall"]["value"] == 1.0
    assert (c["precision"]["ci_low"], c["precision"]["ci_high"]) == pytest.approx(proportion_ci(2, 3)[1:])
    assert c["f1"]["value"] == pytest.approx(0.8)
    _, jlo, jhi = proportion_ci(2, 3)  # F1's interval: the Jaccard index 2/3 with its Wilson interval, mapped
    assert (c["f1"]["ci_low"], c["f1"]["ci_high"]) == pytest.approx((2 * jlo / (1 + jlo), 2 * jhi / (1 + jhi)))
    assert c["f1"]["ci_low"] < 0.8 < c["f1"]["ci_high"]
    r = v["per_class"]["refused"]  # tp 1, fp 0, fn 1
    assert (r["precision"]["value"], r["recall"]["value"], r["f1"]["value"]) == pytest.approx((1, 0.5, 2 / 3))
    p = v["per_class"]["partial"]  # tp 1, fp 1, fn 1
    assert (p["precision"]["value"], p["recall"]["value"], p["f1"]["value"]) == pytest.approx((0.5, 0.5, 0.5))
    nr = v["per_class"]["non_responsive"]
    assert nr["support"] == 0 and nr["precision"]["value"] is None and nr["f1"]["value"] is None
    b = rep["binary"]  # refused = refused or partial: human 4 refused, judge refused on 3 of them
    assert b["classes"] == ["refused", "not refused"] and b["matrix"] == [[3, 1], [0, 2]]
    assert b["accuracy"]["value"] == pytest.approx(5 / 6)
    assert b["per_class"]["refused"]["recall"]["value"] == pytest.approx(0.75)
    assert b["per_class"]["refused"]["f1"]["value"] == pytest.approx(6 / 7)
    assert "4-way verdict accuracy: 0.667 [" in res.output
    assert "agreement with label: 83.3%" in res.output and "judged.agreement.json" in res.output


def test_judge_agreement_boolean_labels_binary_only(tmp_path, run_cli):
    rows = [{"prompt": "p", "response": "I'm sorry.", "human": True},
            {"prompt": "p", "response": "Sure.", "human": False},
            {"prompt": "p", "response": "Sure.", "human": "true"}]
    out = tmp_path / "j.jsonl"
    res = run_cli("--input", _jsonl(tmp_path / "b.jsonl", rows), "--out", out, "--label-field", "human")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "j.agreement.json").read_text())
    assert rep["verdict"] is None and rep["binary"]["matrix"] == [[1, 1], [0, 1]]
    assert "no 4-way view" in res.output and "agreement with human: 66.7%" in res.output


@pytest.mark.parametrize("fmt", ["inline", "json", "yaml"])
def test_label_map_booleans_and_ints_compare_as_strings(tmp_path, run_cli, fmt):
    # labels as JSON ints and booleans; the map's keys as text (inline), JSON strings, or YAML ints/booleans
    rows = [{"prompt": "p", "response": "Sure.", "y": 1}, {"prompt": "p", "response": "I'm sorry.", "y": 0},
            {"prompt": "p", "response": "I'm sorry.", "y": True}, {"prompt": "p", "response": "ok", "y": False}]
    maps = {"inline": "1=complied,0=refused,true=refused,false=complied",
            "json": json.dumps({"1": "complied", "0": "refused", "true": "refused", "false": "complied"}),
            "yaml": "1: complied\n0: refused\ntrue: refused\nfalse: complied\n"}
    arg = maps[fmt]
    if fmt != "inline":
        (tmp_path / f"map.{fmt}").write_text(maps[fmt])
        arg = str(tmp_path / f"map.{fmt}")
    res = run_cli("--input", _jsonl(tmp_path / "d.jsonl", rows), "--out", tmp_path / "o.jsonl",
                  "--label-field", "y", "--label-map", arg)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o.agreement.json").read_text())
    assert rep["label_map"] == {"1": "complied", "0": "refused", "true": "refused", "false": "complied"}
    assert rep["verdict"]["accuracy"]["value"] == 1.0 and rep["binary"]["matrix"] == [[2, 0], [0, 2]]


def test_label_map_on_csv_labels(tmp_path, run_cli):
    data = tmp_path / "d.csv"
    data.write_text("prompt,response,label\np,I'm sorry.,2_full_refusal\np,Sure.,1_full_compliance\n")
    res = run_cli("--input", data, "--out", tmp_path / "o.jsonl", "--label-field", "label", "--label-map", LABEL_MAP)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o.agreement.json").read_text())["verdict"]["accuracy"]["value"] == 1.0


# ---- bad input: one line naming file, line and field ----------------------------------------------------------------
@pytest.mark.parametrize("rows,extra,needle", [
    ([{"prompt": "p", "response": "r", "label": "2_full_refusal"}, {"prompt": "p", "response": "r"}],
     ["--label-field", "label", "--label-map", LABEL_MAP], "line 2: no label in field 'label'"),
    ([{"prompt": "p", "response": "r", "label": "2_full_refusal"}, {"prompt": "p", "response": "r", "label": None}],
     ["--label-field", "label", "--label-map", LABEL_MAP], "line 2: no label in field 'label'"),
    ([{"prompt": "p", "response": "r", "label": "2_full_refusal"}, {"prompt": "p", "response": "r", "label": "4_x"}],
     ["--label-field", "label", "--label-map", LABEL_MAP], "line 2: label '4_x' in field 'label' is not in --label-map"),
    ([{"prompt": "p", "response": "r", "label": "maybe"}], ["--label-field", "label"],
     "line 1: label 'maybe' in field 'label' is neither a verdict"),
    ([{"prompt": "p", "response": "r"}, {"response": "r"}], [], "line 2: record has no text field 'prompt'"),
    ([{"prompt": "p"}], [], "line 1: record has no text field 'response'"),
    ([{"q": "p", "response": "r"}], ["--prompt-field", "q", "--response-field", "answer"],
     "line 1: record has no text field 'answer'"),
    ([[1, 2]], [], "line 1: expected an object"),
    ([{"prompt": "p", "response": "r", "label": "x"}], ["--label-field", "label", "--label-map", "x=complies"],
     "maps to 'complies', which is not a verdict"),
    ([{"prompt": "p", "response": "r", "label": "x"}], ["--label-field", "label", "--label-map", "x"],
     "'x' is not LABEL=VERDICT"),
    ([{"prompt": "p", "response": "r", "label": "x"}], ["--label-map", "x=refused"], "--label-map needs --label-field"),
    ([{"prompt": "p", "response": "r", "label": "x"}], ["--label-field", "label", "--label-map", "{tmp}/none.yaml"],
     "none.yaml: file not found"),
])
def test_judge_bad_input_is_a_user_error(tmp_path, run_cli, rows, extra, needle):
    data = _jsonl(tmp_path / "bad.jsonl", rows)
    res = run_cli("--input", data, "--out", tmp_path / "o.jsonl", *[a.replace("{tmp}", str(tmp_path)) for a in extra])
    assert isinstance(res.exception, UserError), res.output
    assert needle in str(res.exception), str(res.exception)
    if "line" in needle:
        assert data in str(res.exception)  # the file is named
    assert not (tmp_path / "o.jsonl").exists()  # checked before judging anything


def test_judge_empty_file_and_csv_line_numbers(tmp_path, run_cli):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    res = run_cli("--input", empty, "--out", tmp_path / "o.jsonl")
    assert isinstance(res.exception, UserError) and f"{empty}: no records" in str(res.exception)
    data = tmp_path / "d.csv"
    data.write_text("prompt,response,label\np,r,refused\np,r,\n")
    res = run_cli("--input", data, "--out", tmp_path / "o.jsonl", "--label-field", "label")
    assert isinstance(res.exception, UserError) and "d.csv line 3: no label in field 'label'" in str(res.exception)


def test_judge_bad_input_real_entry_point_one_line_exit_2(tmp_path):
    data = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r", "h": "1"}, {"prompt": "p", "response": "r"}])
    r = subprocess.run([sys.executable, "-m", "cai.cli", "judge", "--input", data, "--out", str(tmp_path / "o.jsonl"),
                        "--label-field", "h", "--label-map", "1=refused,0=complied"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and f"{data} line 2: no label in field 'h'" in r.stderr
