import pytest

from cai.config import load_config
from cai.errors import UserError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["generation.max_new_tokens=7", "models.policy=tiny-random"])
    assert cfg.generation.max_new_tokens == 7 and cfg.models.feedback_spec == "tiny-random"
    assert cfg.models.weak_feedback


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models:\n  polcy: x\n")
    with pytest.raises(UserError, match=r"c\.yaml: models\.polcy: unknown key"):
        load_config(p)


def test_wrong_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generation:\n  max_new_tokens: lots\n")
    with pytest.raises(UserError, match=r"generation\.max_new_tokens"):
        load_config(p)


def test_malformed_yaml_has_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(UserError, match=r"c\.yaml: line \d+"):
        load_config(p)


def test_missing_file_and_unknown_stage(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="unknown stage"):
        load_config(None, ["stages=[prompts, bogus]"])


def test_bundled_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = list(root.glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)
