import json

import pytest

from cai.errors import UserError
from cai.runs import JsonlWriter, RunDir, read_jsonl


def test_writer_skips_done_ids_and_repairs_torn_line(tmp_path):
    p = tmp_path / "a.jsonl"
    with JsonlWriter(p) as w:
        w.write({"id": "1", "x": 1})
        w.write({"id": "2", "x": 2})
        w.write({"id": "1", "x": "dup"})  # already there: ignored
    with open(p, "a") as f:
        f.write('{"id": "3", "x"')  # a process killed mid-line
    with JsonlWriter(p) as w:
        assert "1" in w and "2" in w and "3" not in w
        w.write({"id": "3", "x": 3})
    recs = read_jsonl(p)
    assert [r["id"] for r in recs] == ["1", "2", "3"]


def test_corrupt_middle_line_is_a_user_error(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(UserError, match="a.jsonl:2"):
        read_jsonl(p)


def test_stage_refuses_changed_config_unless_forced(tmp_path):
    run = RunDir.create(tmp_path, "r")
    st = run.stage("gen")
    st.begin({"a": 1, "b": {"c": 2}})
    with st.writer() as w:
        w.write({"id": "x"})
    st.finish({"n": 1})
    manifest = json.loads(st.manifest_path.read_text())
    assert manifest["status"] == "complete" and manifest["counts"] == {"n": 1}
    assert "torch" in manifest["versions"] and manifest["config_hash"]
    st2 = run.stage("gen")
    with pytest.raises(UserError, match=r"b\.c: 2 -> 3.*--force"):
        st2.begin({"a": 1, "b": {"c": 3}})
    st2.begin({"a": 1, "b": {"c": 3}}, force=True)
    assert not (st2.path / "data.jsonl").exists()  # recomputed from scratch
    assert any(p.name.startswith("gen.old-") for p in tmp_path.joinpath("r").iterdir())  # old results kept


def test_same_config_resumes(tmp_path):
    run = RunDir.create(tmp_path, "r")
    st = run.stage("s")
    st.begin({"a": 1})
    st.skip("item-9", "too long")
    st.save()
    st2 = run.stage("s")
    st2.begin({"a": 1})
    assert st2.manifest["attempts"] == 2 and st2.manifest["skipped"][0]["id"] == "item-9"


def test_missing_artifact_names_the_stage(tmp_path):
    run = RunDir.create(tmp_path, "r")
    with pytest.raises(UserError, match="no completed 'critique' stage"):
        run.artifact("critique")


def test_bad_run_name(tmp_path):
    with pytest.raises(UserError):
        RunDir.create(tmp_path, "../x")
