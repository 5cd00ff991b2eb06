import json

import pytest

from cai.errors import UserError
from cai.runs import JsonlWriter, RunDir, read_jsonl, run_step, write_csv


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


def test_changed_config_message_names_only_what_changed(tmp_path):
    """A tuple in the config is stored as a JSON list: the message must not call that a change."""
    run = RunDir.create(tmp_path, "r")
    run.stage("gen").begin({"clamp": (0.4, 0.6), "elo": True})
    with pytest.raises(UserError) as err:
        run.stage("gen").begin({"clamp": (0.4, 0.6), "elo": False})
    assert "(elo: True -> False)" in str(err.value) and "clamp" not in str(err.value)


def test_same_config_resumes(tmp_path):
    run = RunDir.create(tmp_path, "r")
    st = run.stage("s")
    st.begin({"a": 1})
    st.skip("item-9", "too long")
    st.save()
    st2 = run.stage("s")
    st2.begin({"a": 1})
    assert st2.manifest["attempts"] == 2 and st2.manifest["skipped"][0]["id"] == "item-9"


def test_run_step_reuses_a_complete_step_with_the_same_config_only(tmp_path):
    run = RunDir.create(tmp_path, "r")
    calls = []

    def fn(stage):
        calls.append(stage.stage)
        stage.finish({"n": len(calls)})
        return {"n": len(calls)}

    first = run_step(run, "s", {"a": 1}, fn)
    assert not first.reused and first.value == {"n": 1} and first.stage.complete
    again = run_step(run, "s", {"a": 1}, fn)
    assert again.reused and again.value is None and again.stage.manifest["counts"] == {"n": 1} and len(calls) == 1
    with pytest.raises(UserError, match="--force"):  # a changed config is refused, not silently reused or redone
        run_step(run, "s", {"a": 2}, fn)
    assert not run_step(run, "s", {"a": 2}, fn, force=True).reused and len(calls) == 2
    assert not run_step(run, "s", {"a": 2}, fn, force=True).reused and len(calls) == 3  # force recomputes


def test_run_step_reruns_in_place_when_the_revision_changes(tmp_path):
    run = RunDir.create(tmp_path, "r")
    calls = []

    def fn(stage):  # appends one line per call to an artifact that a rerun in place must keep
        calls.append(stage.manifest.get("revision"))
        with stage.writer("answers.jsonl") as w:
            w.write({"id": f"call-{len(calls)}"})
        stage.finish()

    assert not run_step(run, "eval", {"a": 1}, fn, revision="judge@v1").reused
    assert run_step(run, "eval", {"a": 1}, fn, revision="judge@v1").reused and len(calls) == 1
    step = run_step(run, "eval", {"a": 1}, fn, revision="judge@v2")  # the judge changed, the config did not
    assert not step.reused and calls == ["judge@v1", "judge@v2"]
    assert [r["id"] for r in read_jsonl(step.stage.file("answers.jsonl"))] == ["call-1", "call-2"]  # kept
    assert not list(tmp_path.joinpath("r").glob("eval.old-*"))  # not moved aside as a changed config would be
    assert json.loads(step.stage.manifest_path.read_text())["revision"] == "judge@v2"
    assert run_step(run, "eval", {"a": 1}, fn, revision="judge@v2").reused
    assert run_step(run, "eval", {"a": 1}, fn).reused and len(calls) == 2  # a step that names no revision


def test_run_step_reruns_an_unfinished_step(tmp_path):
    run = RunDir.create(tmp_path, "r")
    run_step(run, "s", {"a": 1}, lambda stage: None)  # never finished (killed, say)
    assert not run_step(run, "s", {"a": 1}, lambda stage: stage.finish()).reused
    assert run_step(run, "s", {"a": 1}, lambda stage: 1 / 0).reused


def test_write_csv_keeps_the_columns_in_order(tmp_path):
    path = tmp_path / "sub" / "x.csv"
    write_csv(path, [{"b": 2, "a": "x,y", "extra": 0}, {"a": 1}], ["a", "b"])
    assert path.read_bytes() == b'a,b\r\n"x,y",2\r\n1,\r\n'
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]  # no temporary file left


def test_missing_artifact_names_the_stage(tmp_path):
    run = RunDir.create(tmp_path, "r")
    with pytest.raises(UserError, match="no completed 'critique' stage"):
        run.artifact("critique")


def test_bad_run_name(tmp_path):
    with pytest.raises(UserError):
        RunDir.create(tmp_path, "../x")


# ---- issue 13: one writer per folder; duplicates repaired; line splitting ---------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from cai.runs import StageDir
StageDir(Path(sys.argv[1]), "generate").begin({"a": 1})
print("locked", flush=True)
time.sleep(60)
"""


def _holder(folder):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    import os

    from cai.runs import LOCK_NAME, StageDir, unlock_folder

    folder = tmp_path / "out"
    proc = _holder(folder)
    try:
        with pytest.raises(UserError, match=rf"being written by another cai process \(pid {proc.pid}, since"):
            StageDir(folder, "generate").begin({"a": 1})
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            RunDir.create(tmp_path, "out")  # the same folder as a run folder
    finally:
        proc.kill()  # SIGKILL: no clean-up; the lock file stays, with the dead pid in it
        proc.wait()
    assert f'"pid": {proc.pid}' in (folder / LOCK_NAME).read_text()
    st = StageDir(folder, "generate")
    st.begin({"a": 1})  # the stale lock is taken over
    assert f'"pid": {os.getpid()}' in (folder / LOCK_NAME).read_text()
    st.finish()
    unlock_folder(folder)


def test_cli_generate_refuses_a_folder_another_process_writes(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "out"
    proc = _holder(folder)
    try:
        prompts = tmp_path / "p.txt"
        prompts.write_text("hello\n")
        res = subprocess.run([sys.executable, "-m", "cai.cli", "generate", "--model", "tiny-random", "--prompts",
                              str(prompts), "--out", str(folder)], capture_output=True, text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert res.returncode == 2 and f"pid {proc.pid}" in res.stderr and "Traceback" not in res.stderr


def test_resume_repairs_records_written_twice(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"id": str(i % 3), "x": i}) + "\n" for i in range(6)))
    with JsonlWriter(p) as w:
        assert sorted(w.done) == ["0", "1", "2"] and len(w.records) == 3
    assert [r["x"] for r in read_jsonl(p)] == [0, 1, 2]


def test_jsonl_lines_split_only_on_newlines(tmp_path):
    p = tmp_path / "a.jsonl"
    text = "x\u2028y\u0085z\rw"  # U+2028 and U+0085 are legal inside a JSON string; str.splitlines splits on them
    p.write_bytes((json.dumps({"id": "a", "t": text}, ensure_ascii=False) + "\r\n" + '{"id": "b"}\n').encode())
    assert [r["id"] for r in read_jsonl(p)] == ["a", "b"] and read_jsonl(p)[0]["t"] == text


def test_out_pointing_at_a_file_is_a_user_error(tmp_path):
    from cai.runs import StageDir

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        StageDir(f, "generate").begin({})
    with pytest.raises(UserError, match="is a file, not a folder"):
        RunDir.create(tmp_path, "file")
