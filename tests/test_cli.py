"""The CLI end to end in subprocesses: generate, kill-and-resume, and one-line errors for bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CAI = [sys.executable, "-m", "cai.cli"]


def cai(*args, timeout=300, **kw):
    return subprocess.run([*CAI, *args], capture_output=True, text=True, timeout=timeout, **kw)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def test_generate_killed_midway_resumes_exactly_once(tmp_path, tiny_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"Question number {i}: tell me about topic {i}." for i in range(50)))
    out = tmp_path / "out"
    args = ["generate", "--model", "tiny-random", "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "24", "--batch-size", "4"]
    proc = subprocess.Popen([*CAI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resp = out / "responses.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until some but not all items are written, then kill -9
        if resp.exists() and 8 <= len(resp.read_text().splitlines()) < 50:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(_ids(resp))
    assert 0 < n_before < 50
    res = cai(*args)
    assert res.returncode == 0, res.stderr
    ids = _ids(resp)
    assert len(ids) == 50 and len(set(ids)) == 50
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["responses"] == 50
    assert manifest["counts"]["already_done"] >= n_before


@pytest.mark.parametrize("setup,args,needle", [
    (None, ["generate", "--model", "nope!", "--prompts", "redteam", "--out", "{tmp}/o"], "unknown model spec"),
    (None, ["generate", "--model", "openai:m@http://127.0.0.1:9/v1", "--prompts", "{tmp}/missing.jsonl",
            "--out", "{tmp}/o"], "missing.jsonl"),
    ("bad.jsonl:\xff\xfe", ["generate", "--model", "tiny-random", "--prompts", "{tmp}/bad.jsonl", "--out", "{tmp}/o"],
     "UTF-8"),
    ('f.jsonl:{"q": "a"}\n', ["generate", "--model", "tiny-random", "--prompts", "{tmp}/f.jsonl", "--field", "prompt",
                             "--out", "{tmp}/o"], "--field"),
    ("e.txt:", ["generate", "--model", "tiny-random", "--prompts", "{tmp}/e.txt", "--out", "{tmp}/o"], "no prompts"),
    ("c.yaml:models: [1,\n", ["run", "{tmp}/c.yaml"], "c.yaml"),
    ("c.yaml:modles: {}\n", ["run", "{tmp}/c.yaml"], "modles: unknown key"),
    # issue 13
    ("f.txt:hi\n", ["generate", "--model", "tiny-random", "--prompts", "{tmp}/f.txt", "--out", "{tmp}/f.txt"],
     "is a file, not a folder"),
    ("c.yaml:name: x\xff\xfe\n", ["constitution", "check", "{tmp}/c.yaml"], "not UTF-8"),
    ("c.yaml:name: x\xff\xfe\n", ["guard", "serve", "--constitution", "{tmp}/c.yaml", "--port", "0",
                                   "--audit-log", "{tmp}/a.jsonl"], "not UTF-8"),
    (None, ["guard", "serve", "--audit-log", "{tmp}"], "is a directory"),
    (None, ["guard", "serve", "--host", "0.0.0.0", "--api-key", "", "--audit-log", "{tmp}/a.jsonl"],
     "empty API key"),
    (None, ["run", "--set", "seed=1180591620717411303424"], "seed"),
    (None, ["run", "quickstrat"], "quickstrat: file not found, and not a bundled run config (bundled: quickstart)"),
    (None, ["unalign", "{tmp}/nope.yaml"], "not a bundled experiment config (bundled: backdoor, controllability, "
                                            "persona, poison_scan, prefill_recovery, subliminal, unalign)"),
    # issue 15: labelers
    (None, ["label", "--reference", "{tmp}/r.jsonl", "--labeler", "vote"],
     "--labeler 'vote' is not a labeler; choose one of: choice, contrast"),
    ("c.yaml:name: bare\ndescription: d\nsystem_prompt: s\nrefusal_style: r\nprinciples:\n"
     "  - {name: a, label: l, critique: c, revision: r, preference: p}\n",
     ["label", "--reference", "{tmp}/r.jsonl", "--labeler", "contrast", "-c", "{tmp}/c.yaml"],
     "contrast labeler needs every principle's inverse, and constitution 'bare' has none for: a"),
    ('r.jsonl:{"prompt": "q", "chosen": "x"}\n', ["label", "--reference", "{tmp}/r.jsonl", "--labeler", "contrast"],
     "r.jsonl:1: reference file row is missing rejected"),
    (None, ["label", "--reference", "{tmp}/r.jsonl", "--labeler", "contrast", "--wording", "poem"],
     "cai label: contrast_wording: Input should be"),
    # issue 18: precision
    (None, ["eval", "--prompts", "redteam", "--dtype", "int4", "--out", "{tmp}/e"],
     "--dtype 'int4': choose one of auto, float32, bfloat16, float16, int8"),
    (None, ["run", "--set", "models.dtype=int4"], "models.dtype: Input should be"),
    (None, ["label", "--reference", "{tmp}/r.jsonl", "--labeler", "contrast", "--dtype", "fp8"],
     "--dtype 'fp8': choose one of auto, float32, bfloat16, float16, int8"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, setup, args, needle):
    if setup:
        name, content = setup.split(":", 1)
        data = content.encode("latin-1") if "\xff" in content else content.encode()
        (tmp_path / name).write_bytes(data)
    res = cai(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    err = " ".join(res.stderr.split())
    assert needle in err, err
    assert err.startswith("error:")


def test_max_new_tokens_over_the_context_is_exit_2_not_an_empty_success(tmp_path):
    (tmp_path / "f.txt").write_text("hi\n")
    res = cai("generate", "--model", "tiny-random", "--prompts", str(tmp_path / "f.txt"), "--out",
              str(tmp_path / "o"), "--max-new-tokens", "100000", timeout=120)
    err = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in err
    assert "error: max_new_tokens=100000 leaves no room for a prompt in the context of 'tiny-random'" in err


def test_huge_seed_is_a_usage_error_not_a_traceback(tmp_path):
    res = cai("generate", "--model", "tiny-random", "--prompts", "benign", "--out", str(tmp_path / "o"),
              "--seed", str(2**70), timeout=120)
    assert res.returncode == 2 and "--seed" in res.stderr and "Traceback" not in res.stderr


def test_guard_port_in_use_is_one_line_exit_2_before_models_load(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.time()
        res = cai("guard", "serve", "--port", str(port), "--policy", "tiny-random", "--supervisor", "tiny-random",
                  "--audit-log", str(tmp_path / "a.jsonl"), timeout=120)
    assert res.returncode == 2 and "already in use" in res.stderr and "Traceback" not in res.stderr
    assert "loading models" not in res.stderr or time.time() - t0 < 30


def test_changed_config_hint_names_a_flag_the_command_has(tmp_path):
    out = str(tmp_path / "o")
    first = cai("generate", "--model", "nope!", "--prompts", "benign", "--limit", "1", "--out", out, timeout=120)
    assert first.returncode == 2  # the folder's manifest now records model "nope!"
    res = cai("generate", "--model", "tiny-random", "--prompts", "benign", "--limit", "1", "--out", out, timeout=120)
    err = " ".join(res.stderr.split())
    assert res.returncode == 2 and "different config" in err and "--out" in err and "--name" not in err


def test_unreachable_server_exit_2(tmp_path):
    res = cai("generate", "--model", "openai:m@http://127.0.0.1:9/v1", "--prompts", "benign", "--limit", "1",
              "--out", str(tmp_path / "o"), timeout=120)
    assert res.returncode == 2 and "unreachable" in res.stderr and "Traceback" not in res.stderr


def test_run_pipeline_resumes_and_refuses_changed_config(tmp_path, tiny_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"name: t\nruns_dir: {tmp_path}/runs\nmodels: {{policy: tiny-random, batch_size: 4}}\n"
        "prompts: {source: redteam, limit: 6}\nbenign: {source: benign, limit: 3}\n"
        "generation: {max_new_tokens: 8}\nstages: [prompts, generate]\n"
    )
    res = cai("run", str(cfg))
    assert res.returncode == 0, res.stderr
    resp = tmp_path / "runs/t/generate/responses.jsonl"
    assert len(_ids(resp)) == 6
    again = cai("run", str(cfg))
    assert again.returncode == 0 and "already complete" in again.stderr
    changed = cai("run", str(cfg), "--set", "generation.max_new_tokens=9")
    assert changed.returncode == 2 and "max_new_tokens: 8 -> 9" in changed.stderr
    forced = cai("run", str(cfg), "--set", "generation.max_new_tokens=9", "--force")
    assert forced.returncode == 0, forced.stderr


def test_models_lists_aliases():
    res = cai("models", timeout=60)
    assert res.returncode == 0 and "smollm2-135m" in res.stdout
