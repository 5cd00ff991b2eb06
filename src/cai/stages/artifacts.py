"""What a stage reads from earlier stages of its run: the prompt sets, the run's constitution, the classify
stage's principle probabilities, and the trained checkpoints. Every stage goes through here, so no stage reaches
into a sibling stage's module (or the orchestrator) to find an artifact."""

from __future__ import annotations

from dataclasses import dataclass

from cai.constitution import Constitution, load_constitution
from cai.data import Prompt
from cai.errors import UserError
from cai.runs import RunDir, read_jsonl

PROMPT_FIELDS = ("id", "prompt", "category", "split", "source")


def read_prompts(run: RunDir, name: str = "prompts") -> list[Prompt]:
    """The prompt records the run's ``prompts`` stage wrote to ``<name>.jsonl`` (``prompts`` or ``benign``)."""
    return [
        Prompt(**{k: r[k] for k in PROMPT_FIELDS if k in r})
        for r in read_jsonl(run.artifact("prompts", f"{name}.jsonl"))
    ]


def run_constitution(config) -> Constitution:
    """The run's constitution (config field ``constitution``); errors name the config field."""
    try:
        return load_constitution(config.constitution)
    except UserError as exc:
        raise UserError(f"config field 'constitution' ({config.constitution!r}): {exc}") from None


def principle_probabilities(run: RunDir) -> dict[str, dict[str, float]] | None:
    """Per prompt id, the classify stage's probability of each principle it kept; None when the run has no
    completed classify stage."""
    if not run.stage("classify").complete:
        return None
    return {
        r["id"]: {q["name"]: float(q["p"]) for q in r.get("principles", [])}
        for r in read_jsonl(run.artifact("classify"))
    }


@dataclass(frozen=True)
class Checkpoint:
    """A policy the run can evaluate: its model spec and a fingerprint that changes when it is retrained."""

    spec: str
    fingerprint: str
    finished_at: str = ""


# the stages that train a policy, by checkpoint label, in data-flow order; and where each leaves its model
TRAINED = {"sl": ("sft", "merged"), "rl": ("rl", "model"), "dpo": ("dpo", "model")}


def checkpoints(run: RunDir, config) -> dict[str, Checkpoint]:
    """label -> checkpoint: ``base`` (the config's policy), then ``sl``, ``rl`` and ``dpo`` for each of those the
    run trained (a completed stage whose model folder exists), in data-flow order."""
    policy = config.models.policy
    out = {"base": Checkpoint(policy, policy)}
    for label, (stage, folder) in TRAINED.items():
        st, model = run.stage(stage), run.root / stage / folder
        exists = model.is_dir() if label == "sl" else (model / "config.json").is_file()
        if st.complete and exists and str(model) != policy:
            m = st.manifest
            out[label] = Checkpoint(
                str(model), f"{model}@{m.get('config_hash')}@{m.get('finished_at')}", m.get("finished_at", "")
            )
    return out


def sl_model_spec(run: RunDir, config) -> str:
    """The SL-CAI model (``sft/merged``) if the sft stage completed, else the config's policy: what the
    preference, reward, RL and DPO stages start from."""
    cps = checkpoints(run, config)
    return cps.get("sl", cps["base"]).spec


def final_model_spec(run: RunDir, config) -> str:
    """The newest trained policy: rl/ or dpo/ (whichever finished last), else the SL model, else the policy."""
    cps = checkpoints(run, config)
    rl = [(cps[label].finished_at, label) for label in ("rl", "dpo") if label in cps]
    return cps[max(rl)[1]].spec if rl else cps.get("sl", cps["base"]).spec
