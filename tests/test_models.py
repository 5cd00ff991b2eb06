import subprocess
import sys
from pathlib import Path

import pytest

from cai.errors import UserError
from cai.models import _atomic_build, parse_spec


def test_parse_aliases_and_kinds(tmp_path):
    assert parse_spec("smollm2-135m").kind == "embedded"
    assert parse_spec("SmolLM2-135M-Instruct").kind == "embedded"
    assert parse_spec("tiny-random").kind == "tiny"
    assert parse_spec("HuggingFaceTB/SmolLM2-1.7B-Instruct").kind == "hub"
    s = parse_spec("openai:qwen@http://127.0.0.1:8000/v1,http://127.0.0.1:8001/v1/")
    assert s.kind == "openai" and s.target == "qwen"
    assert s.base_urls == ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert parse_spec(str(tmp_path / "m")).kind == "local"


@pytest.mark.parametrize("bad", ["", "openai:model", "openai:@http://x", "openai:m@ftp://x", "no such thing!",
                                 "missing.gguf"])
def test_bad_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        parse_spec(bad)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(UserError, match="not a Hugging Face model"):
        parse_spec(str(tmp_path))


def test_atomic_build_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "ckpt"

    def boom(out: Path):
        (out / "half.bin").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _atomic_build(final, boom)
    assert not final.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    _atomic_build(final, lambda out: (out / "w.bin").write_text("ok"))
    assert (final / ".complete").is_file() and (final / "w.bin").read_text() == "ok"


def test_concurrent_builders_build_once(tmp_path):
    """Two processes asking for the same checkpoint at once: one builds, the other waits and reuses it."""
    code = (
        "import sys,time; from pathlib import Path; from cai.models import _atomic_build\n"
        "def b(out):\n"
        "    time.sleep(1); (out/'w').write_text('x'); open(sys.argv[2],'a').write('built\\n')\n"
        "_atomic_build(Path(sys.argv[1]), b)\n"
    )
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c"), str(log)]) for _ in range(2)]
    assert all(p.wait(60) == 0 for p in procs)
    assert log.read_text().count("built") == 1
    assert (tmp_path / "c" / ".complete").is_file()


def test_tiny_checkpoint_is_a_two_layer_llama(tiny_path):
    import json

    cfg = json.loads((Path(tiny_path) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["model_type"] == "llama"
    assert (Path(tiny_path) / "tokenizer.json").is_file()


def test_embedded_checkpoint_is_cached_safetensors(tiny_path):
    from cai.models import embedded_checkpoint

    path = embedded_checkpoint()  # built by the tiny fixture already
    assert (path / "model.safetensors").is_file() and (path / ".complete").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
