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


def test_a_model_spec_that_cannot_name_a_model_fails_at_load_naming_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models:\n  feedback: openai:qwen\n")
    with pytest.raises(UserError, match=r"^.*c\.yaml: models\.feedback: model spec 'openai:qwen': expected openai:"):
        load_config(p)
    with pytest.raises(UserError, match=r"models\.policy: unknown model spec 'no such model'"):
        load_config(None, ["models.policy=no such model"])
    assert load_config(None, ["models.feedback=openai:m@http://127.0.0.1:9/v1"]).models.feedback.startswith("openai:")


def test_malformed_yaml_has_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(UserError, match=r"c\.yaml: line \d+"):
        load_config(p)


def test_a_key_set_twice_is_an_error_not_the_last_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\nseed: 1\nseed: 2\n")
    with pytest.raises(UserError, match=r"c\.yaml: line 3, column 1: duplicate key 'seed'"):
        load_config(p)


def test_missing_file_and_unknown_stage(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="unknown stage"):
        load_config(None, ["stages=[prompts, bogus]"])


def test_bundled_configs_validate_by_name_and_the_checkout_recipes_by_path():
    from pathlib import Path

    from cai.experiments import backdoor, controllability, persona, poison_eval, prefill_recovery, subliminal, unalign
    from cai.experiments.config import load_experiment_config
    from cai.base_config import bundled_configs

    assert bundled_configs("run") == ("quickstart",)
    assert load_config("quickstart").name == "quickstart"
    classes = {"backdoor": backdoor.BackdoorConfig, "unalign": unalign.UnalignConfig,
               "prefill_recovery": prefill_recovery.PrefillRecoveryConfig,
               "controllability": controllability.ControllabilityConfig, "persona": persona.PersonaConfig,
               "subliminal": subliminal.SubliminalConfig, "poison_scan": poison_eval.ScanEvalConfig}
    assert bundled_configs("experiment") == tuple(sorted(classes))
    for name, cls in classes.items():
        assert isinstance(load_experiment_config(cls, name), cls)
    root = Path(__file__).resolve().parents[1] / "configs"
    files = list(root.glob("*.yaml"))  # user recipes, and links to the bundled files
    assert {f.name for f in files} >= {"quickstart.yaml", "feedback-openai.yaml"}
    for f in files:
        load_config(f)


def test_a_config_that_is_neither_bundled_nor_a_file_names_the_bundled_ones(tmp_path):
    from cai.experiments.backdoor import BackdoorConfig
    from cai.experiments.config import load_experiment_config

    with pytest.raises(UserError, match=r"^quickstrat: file not found, and not a bundled run config \(bundled: "
                                        r"quickstart\)$"):
        load_config("quickstrat")
    with pytest.raises(UserError, match=r"not a file, and not a bundled experiment config \(bundled: backdoor, "
                                        r"controllability, persona, poison_scan, prefill_recovery, subliminal, "
                                        r"unalign\)"):
        load_experiment_config(BackdoorConfig, tmp_path)


def test_one_decoding_config_greedy_for_experiments_with_stable_step_hashes():
    from cai.experiments.unalign import UnalignConfig
    from cai.runs import config_hash
    from cai.base_config import GreedyGenerationConfig

    assert load_config(None).generation.temperature == 0.7  # the pipeline samples by default
    partial = UnalignConfig.model_validate({"decode": {"max_new_tokens": 64}})
    assert (partial.decode.temperature, partial.decode.top_p) == (0.0, 1.0)  # a partial section stays greedy
    assert partial.decode.sampling(3, 7).max_new_tokens == 7 and partial.decode.sampling(3).seed == 3
    # steps recorded before `decode` had `stop` keep their hash (pinned: the old DecodeConfig(max_new_tokens=64))
    assert config_hash(GreedyGenerationConfig(max_new_tokens=64).step_config()) == "6b41c25cc6985428"
    with_stop = UnalignConfig.model_validate({"decode": {"stop": ["\n\n"]}})
    assert with_stop.decode.step_config()["stop"] == ["\n\n"] and with_stop.decode.sampling(0).stop == ["\n\n"]
