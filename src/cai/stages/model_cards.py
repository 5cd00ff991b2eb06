"""A run's model cards, rendered from its folder: every trained folder (``sft/adapter``, ``sft/merged``,
``reward/model``, ``rl/``/``dpo/`` ``model`` and ``adapter``) gets a README.md saying what made it — the
constitution (name + hash), the data and its size, the training config, the feedback diagnostics with the
weak-feedback warning, and the eval metrics with CIs once the eval stage has run.

One-way flow: a trainer writes its card with what it knows (cai.training); each training stage then calls
:func:`write_run_model_cards`, and so does the eval stage when it finishes, so every card shows the run as it
stands. The cards are a view of the run folder: rendering them twice gives the same files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cai.model_card import CardFacts, write_model_card
from cai.runs import RunDir, StageDir, config_hash
from cai.stages.artifacts import TRAINED, run_constitution
from cai.training.reward_trend import describe


def write_run_model_cards(run: RunDir, config) -> list[Path]:
    """(Re)write the model card of every trained folder of the run's completed training stages; returns the cards
    written. Only the main process writes (in a distributed launch)."""
    from cai.training.common import is_main_process

    if not is_main_process():
        return []
    constitution = run_constitution(config)
    evaluation = _evaluation(run)
    label_of = {stage: label for label, (stage, _) in TRAINED.items()}
    written = []
    for stage_name, facts_of in _FACTS.items():
        stage = run.stage(stage_name)
        if not stage.complete:
            continue
        facts = replace(
            facts_of(stage, config),
            run=run.name,
            constitution={"name": constitution.name, "hash": config_hash(constitution.model_dump())},
            evaluation=evaluation,
            evaluated_as=label_of.get(stage_name) if evaluation else None,
            feedback=_feedback(run, config, stage_name),
            datasets=[s.source[3:] for s in (config.prompts, config.benign) if s and s.source.startswith("hf:")],
        )
        for folder, adapter in _folders(stage):
            written.append(write_model_card(folder, replace(facts, adapter=adapter)))
    return written


def _folders(stage: StageDir) -> list[tuple[Path, bool]]:
    """The stage's model folders that exist, each with whether it holds a PEFT adapter."""
    found = []
    for name in ("adapter", "merged", "model"):
        folder = stage.path / name
        if (folder / "config.json").is_file():
            found.append((folder, False))
        elif (folder / "adapter_config.json").is_file():
            found.append((folder, True))
    return found


def _counts(stage: StageDir) -> dict[str, Any]:
    return stage.manifest.get("counts", {})


def _settings(stage: StageDir, section: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in stage.manifest.get("config", {}).get(section, {}).items() if k not in drop}


def _sft(stage: StageDir, config) -> CardFacts:
    c = _counts(stage)
    return CardFacts(
        "sft",
        str(c.get("base") or config.sft.base or config.models.policy),
        settings=_settings(stage, "sft", drop=("base",)),
        data={
            "critique/sft.jsonl records (revisions + helpfulness answers)": c.get("records"),
            "trained on": c.get("n_train"),
            "held out (eval loss)": c.get("n_eval"),
        },
        metrics={k: c[k] for k in ("train_loss", "eval_loss", "steps", "train_runtime_s") if k in c},
    )


def _reward(stage: StageDir, config) -> CardFacts:
    path = stage.file("metrics.json")
    m = json.loads(path.read_text()) if path.is_file() else {}
    return CardFacts(
        "reward-model",
        str(m.get("base_model") or config.models.policy),
        settings=_settings(stage, "reward"),
        data={"preferences/data.jsonl pairs trained on": m.get("train_pairs"), "held out": m.get("heldout_pairs")},
        metrics={k: m[k] for k in ("heldout_accuracy", "heldout_ece", "heldout_soft_xent", "train_loss") if k in m},
    )


def _rl(stage: StageDir, config) -> CardFacts:
    c = _counts(stage)
    settings = _settings(stage, "rl")
    return CardFacts(
        str(settings.get("algorithm", "grpo")),
        str(stage.manifest.get("base_model") or config.models.policy),
        settings=settings,
        data={
            "prompts practised on (red-team + benign)": c.get("prompts"),
            "reward": "the rules labeler's utility (rl.reward: rules)"
            if settings.get("reward") == "rules"
            else "reward/model",
        },
        metrics={
            **{k: c[k] for k in ("steps", "reward_first", "reward_last", "reward_delta_halves", "kl_last") if k in c},
            **(
                {"reward trend (paired)": describe(c["reward_paired"])}
                if isinstance(c.get("reward_paired"), dict)
                else {}
            ),
        },
    )


def _dpo(stage: StageDir, config) -> CardFacts:
    c = _counts(stage)
    return CardFacts(
        "dpo",
        str(stage.manifest.get("base_model") or config.models.policy),
        settings=_settings(stage, "dpo"),
        data={
            "preferences/data.jsonl pairs trained on": c.get("pairs"),
            "dropped as uncertain": c.get("dropped_uncertain"),
        },
        metrics={k: c[k] for k in ("steps", "label_smoothing") if k in c},
    )


_FACTS: dict[str, Callable[[StageDir, Any], CardFacts]] = {"sft": _sft, "reward": _reward, "rl": _rl, "dpo": _dpo}


def _feedback(run: RunDir, config, stage_name: str) -> dict[str, Any]:
    """What the feedback model contributed: for SFT (critiques and revisions) whether it is weak; for the stages
    trained on preference pairs also the preferences stage's diagnostics (swap-consistency, entropy, reference
    agreement)."""
    out: dict[str, Any] = {"model": config.models.feedback_spec, "weak": config.models.weak_feedback}
    prefs = run.stage("preferences")
    if stage_name != "sft" and prefs.complete:
        out.update(prefs.manifest.get("diagnostics") or {})
    return out


def _evaluation(run: RunDir) -> dict[str, dict[str, Any]] | None:
    """Each evaluated checkpoint's eval metrics.json (rates with CIs), once the eval stage has completed."""
    ev = run.stage("eval")
    if not ev.complete:
        return None
    out = {}
    for label in _counts(ev).get("checkpoints", []):
        path = ev.path / label / "metrics.json"
        if path.is_file():
            out[label] = json.loads(path.read_text())
    return out or None
