"""Model cards: the ``README.md`` of every folder a trainer saves (adapter, merged model, reward model), with
Hugging Face model-card YAML front matter and a body generated from what made the model.

A card is a pure view of :class:`CardFacts`. Trainers write one with what they know (base model, method,
settings, data size, training metrics); a pipeline run re-renders its cards from the run folder with more
(constitution, feedback diagnostics, eval metrics): see :mod:`cai.stages.model_cards`. ``base_model`` is the
public hub id of the model the training started from, followed through this run's own folders (an RL model
trained from ``sft/merged`` names what SFT started from); a local path never appears there.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cai.evaluation.metrics import HEADLINE_RATES
from cai.runs import atomic_write_text

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded smollm2-135m alias was quantized from
# license of public base models, by hub id prefix (offline: the hub cannot be asked)
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-": "apache-2.0"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
METHOD_TAGS = {"sft": "sft", "reward-model": "reward-model", "grpo": "grpo", "rloo": "rloo", "dpo": "dpo"}


@dataclass
class CardFacts:
    """What a model card says. ``base`` is the model spec training started from, as given; ``adapter`` marks a
    PEFT adapter folder (else a full transformers model). Optional parts are left out of the card when empty."""

    method: str  # sft | reward-model | grpo | rloo | dpo
    base: str
    adapter: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # what it was trained on: description -> size
    metrics: dict[str, Any] = field(default_factory=dict)  # training metrics
    run: str | None = None  # the run (or experiment) it belongs to
    constitution: dict[str, str] | None = None  # {"name", "hash"}
    feedback: dict[str, Any] | None = None  # feedback diagnostics (see cai.labeling.label_diagnostics) + "weak"
    evaluation: dict[str, dict[str, Any]] | None = None  # checkpoint label -> eval metrics.json
    evaluated_as: str | None = None  # this model's label in ``evaluation`` (sl, rl, dpo)
    datasets: list[str] = field(default_factory=list)  # public dataset ids it was trained on


def public_base_model(spec: str) -> str | None:
    """The public hub id behind a model spec, or None when there is none: the embedded default's hub id, a hub
    id as is, and for a local folder the ``base_model`` of its own card (a folder this run trained)."""
    from cai.models import parse_spec

    try:
        s = parse_spec(spec)
    except Exception:  # a folder that is gone since; any problem means "no public id", never a failed save
        return None
    if s.kind == "embedded":
        return EMBEDDED_HUB_ID
    if s.kind in ("hub", "vllm") and _HUB_ID.match(s.target) and not Path(s.target).exists():
        return s.target
    if s.kind == "local":  # its card names the public id it was resolved to when it was written
        found = card_base_model(Path(s.target))
        return found if found and _HUB_ID.match(found) and not Path(found).exists() else None
    return None


def card_base_model(folder: Path) -> str | None:
    """``base_model`` from the YAML front matter of ``folder/README.md`` (None when absent or unreadable)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    base = meta.get("base_model") if isinstance(meta, dict) else None
    return base if isinstance(base, str) else None


def base_license(hub_id: str | None) -> str | None:
    return next((lic for prefix, lic in KNOWN_LICENSES.items() if hub_id and hub_id.startswith(prefix)), None)


def card_metadata(facts: CardFacts) -> dict[str, Any]:
    """The YAML front matter: base_model (a public id only), library_name, tags, datasets, license."""
    hub_id = public_base_model(facts.base)
    meta: dict[str, Any] = {}
    if hub_id:
        meta["base_model"] = hub_id
    meta["library_name"] = "peft" if facts.adapter else "transformers"
    lic = base_license(hub_id)
    if lic:
        meta["license"] = lic
    meta["tags"] = ["constitutional-ai", "cai-lab", "trl", METHOD_TAGS.get(facts.method, facts.method)] + (
        ["lora"] if facts.adapter else []
    )
    if facts.datasets:
        meta["datasets"] = list(facts.datasets)
    if facts.method != "reward-model":
        meta["pipeline_tag"] = "text-generation"
    return meta


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _with_ci(m: Any) -> str:
    """``0.31 [0.22, 0.42] (n=105)`` for a rate dict, else the value ("–" when there is none)."""
    if m is None or (isinstance(m, Mapping) and not m):
        return "–"
    if isinstance(m, Mapping) and "rate" in m:
        if not m.get("n"):
            return "–"
        ci = f" [{m['ci_low']:.2f}, {m['ci_high']:.2f}]" if "ci_low" in m else ""
        return f"{m['rate']:.2f}{ci} (n={m['n']})"
    if isinstance(m, Mapping) and "agreement" in m:
        return f"{m['agreement']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}] (n={m['n']})"
    return _number(m)


def card_body(facts: CardFacts, metadata: Mapping[str, Any]) -> str:
    what = {
        "sft": "supervised (SL-CAI) fine-tune",
        "reward-model": "reward model (sequence classification, one scalar)",
        "grpo": "GRPO (RL-CAI) policy",
        "rloo": "RLOO (RL-CAI) policy",
        "dpo": "DPO (RL-CAI) policy",
    }.get(facts.method, facts.method)
    kind = "LoRA adapter" if facts.adapter else "model"
    title = f"{facts.run} · {facts.method}" if facts.run else f"cai-lab {facts.method}"
    lines = [f"# {title} {kind}", ""]
    base = metadata.get("base_model")
    via = _shown_spec(facts.base)
    started = f"`{base}`" + (f" (via `{via}`)" if base != via else "") if base else f"`{via}`"
    lines += [
        f"A {what} trained with [cai-lab](https://pypi.org/project/cai-lab/) (Constitutional AI on TRL), "
        f"starting from {started}" + (f", in run `{facts.run}`." if facts.run else "."),
        "",
    ]
    from cai.labeling import weak_feedback_reasons  # one list of reasons for the report, the log and the cards

    reasons = weak_feedback_reasons(facts.feedback)
    if reasons:
        lines += [
            "> **Weak feedback.** The AI feedback this model was trained on is weak: "
            + "; ".join(reasons)
            + ". Treat the critiques, revisions and preference labels it gave as noisy, and use a stronger "
            "`models.feedback` for results you rely on.",
            "",
        ]
    if facts.constitution:
        c = facts.constitution
        lines += ["## Constitution", "", f"`{c['name']}` (hash `{c['hash']}`: sha256 of its parsed text, 16 hex)", ""]
    if facts.data:
        lines += ["## Training data", ""] + [f"- {k}: {_number(v)}" for k, v in facts.data.items()] + [""]
    if facts.settings:
        settings = yaml.safe_dump(json.loads(json.dumps(facts.settings, default=str)), sort_keys=False).strip()
        lines += ["## Training configuration", "", "```yaml", settings, "```", ""]
    shown = {k: v for k, v in facts.metrics.items() if not isinstance(v, (list, dict)) or "rate" in v}
    if shown:
        lines += ["## Training metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_with_ci(v)} |" for k, v in shown.items()] + [""]
    if facts.evaluation:
        lines += _evaluation_lines(facts.evaluation, facts.evaluated_as)
    if facts.feedback:
        lines += _feedback_lines(facts.feedback)
    lines += _usage_lines(facts, base)
    return "\n".join(lines).rstrip() + "\n"


def _shown_spec(spec: str) -> str:
    """A model spec as a card shows it: a local folder by its last two path parts (``sft/merged``), so a card
    pushed to the Hub carries no local path."""
    path = Path(spec)
    return "/".join(path.parts[-2:]) if path.is_absolute() or path.exists() else spec


def _evaluation_lines(evaluation: Mapping[str, Mapping[str, Any]], this: str | None) -> list[str]:
    lines = [
        "## Evaluation",
        "",
        "Rates with 95% confidence intervals on the run's held-out eval split (greedy decoding, the run's judge)"
        + (f"; this model is `{this}`." if this else "."),
        "",
        "| checkpoint | " + " | ".join(name for _, name in HEADLINE_RATES) + " |",
        "|---|" + "---|" * len(HEADLINE_RATES),
    ]
    for label, m in evaluation.items():
        name = f"**{label}** (this model)" if label == this else label
        lines.append(f"| {name} | " + " | ".join(_with_ci(m.get(k, {})) for k, _ in HEADLINE_RATES) + " |")
    return lines + [""]


def _feedback_lines(feedback: Mapping[str, Any]) -> list[str]:
    rows = [
        ("labelled pairs", feedback.get("n")),
        ("swap-consistency", feedback.get("swap_consistency")),
        ("label entropy (bits)", feedback.get("label_entropy_bits")),
        ("mean confidence", feedback.get("mean_confidence")),
        ("position bias (P first option wins)", feedback.get("position_bias_first")),
        ("agreement with the human reference", feedback.get("reference")),
        ("feedback model", _shown_spec(feedback["model"]) if feedback.get("model") else None),
    ]
    shown = [(k, v) for k, v in rows if v is not None]
    if not shown:
        return []
    return (
        ["## Feedback diagnostics", "", "| diagnostic | value |", "|---|---|"]
        + [f"| {k} | {_with_ci(v)} |" for k, v in shown]
        + [""]
    )


def _usage_lines(facts: CardFacts, base: str | None) -> list[str]:
    if facts.adapter:
        code = [
            "from peft import AutoPeftModelForCausalLM",
            "",
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")  # loads the base it names, + this',
        ]
    elif facts.method == "reward-model":
        code = [
            "from transformers import AutoModelForSequenceClassification",
            "",
            'model = AutoModelForSequenceClassification.from_pretrained("PATH_OR_REPO")  # num_labels=1',
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        ]
    return ["## Use it", "", "```python", *code, "```", "", "Or with cai-lab: `cai generate --model PATH ...`.", ""]


def render_card(facts: CardFacts) -> str:
    """The whole README.md: YAML front matter and body (validated by huggingface_hub's ModelCardData)."""
    from huggingface_hub import ModelCardData

    meta = card_metadata(facts)
    front = ModelCardData(**meta).to_yaml()  # validates and orders the keys the hub knows
    return f"---\n{front}\n---\n\n{card_body(facts, meta)}"


def write_model_card(folder: str | Path, facts: CardFacts) -> Path:
    """Write ``folder/README.md`` (replacing PEFT's template card) when ``folder`` exists; returns its path."""
    path = Path(folder) / "README.md"
    if Path(folder).is_dir():
        atomic_write_text(path, render_card(facts))
    return path
