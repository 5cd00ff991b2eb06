"""Preference probes read from log-probabilities: the instrument of ``cai subliminal`` and ``cai poison scan``.

A *probe category* (favourite animal, colour, country, ...) is a set of paraphrased one-word questions and a fixed
list of candidate answers. A model's preference is read, never parsed: for each question the chat is rendered with
the model's template, the assistant's turn is prefilled with the category's stem ("My favourite animal is the"),
and every candidate is scored as a continuation (" owl"). A softmax over the candidates' summed log-probabilities
gives, per question, a distribution over the fixed answer list. Multi-token candidates are penalised by that sum,
which is why results are always *shifts* between two models scored the same way (student vs control, probe vs
control): the length bias is the same on both sides and cancels.

Shifts are summarised across questions: the questions are the unit of replication (the paraphrases are the
"many probes" of the experiments), so a shift has a mean, a t-interval and a paired test over questions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cai.errors import UserError
from cai.evaluation.metrics import t_summary

BUNDLED_BATTERY = "preferences-v1"


@dataclass(frozen=True)
class ProbeCategory:
    """Paraphrased questions about one preference and the fixed answers they are scored over."""

    name: str
    questions: tuple[str, ...]
    candidates: tuple[str, ...]
    prefill: str = ""

    def index(self, candidate: str) -> int:
        """The position of ``candidate`` (case-insensitive) in the answer list; UserError naming the list."""
        low = [c.lower() for c in self.candidates]
        if candidate.lower() not in low:
            raise UserError(
                f"{candidate!r} is not a candidate of probe category {self.name!r}; "
                f"pick one of: {', '.join(self.candidates)}"
            )
        return low.index(candidate.lower())


def load_battery(path: str | Path | None = None, *, categories: Sequence[str] | None = None) -> list[ProbeCategory]:
    """The probe battery: the bundled ``preferences-v1`` or a JSON file of the same shape (``templates`` with a
    ``{n}`` slot, and ``categories`` mapping a name to ``noun``, ``prefill`` and ``candidates``; a category may
    list its own ``questions`` instead of using the templates). ``categories`` keeps only those names."""
    if path is None or str(path) == BUNDLED_BATTERY:
        text = resources.files("cai").joinpath("resources", "probes", f"{BUNDLED_BATTERY}.json").read_text()
        where = f"bundled {BUNDLED_BATTERY}"
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"probe battery {p} not found; pass a JSON file or omit it for the bundled battery")
        text, where = p.read_text(encoding="utf-8"), str(p)
    try:
        raw = json.loads(text)
        templates = list(raw.get("templates", []))
        battery = []
        for name, c in raw["categories"].items():
            questions = c.get("questions") or [t.format(n=c["noun"]) for t in templates]
            battery.append(ProbeCategory(name, tuple(questions), tuple(c["candidates"]), c.get("prefill", "")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"probe battery {where}: not a valid battery ({e}); see the bundled preferences-v1.json") from e
    for cat in battery:
        if len(cat.questions) < 2 or len(cat.candidates) < 2:
            raise UserError(f"probe battery {where}: category {cat.name!r} needs ≥ 2 questions and ≥ 2 candidates")
    if categories is not None:
        known = {c.name for c in battery}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise UserError(f"unknown probe categories {unknown}; the battery has: {', '.join(sorted(known))}")
        battery = [c for c in battery if c.name in categories]
    return battery


def _prefix(question: str, prefill: str, system: str | None) -> list[dict]:
    chat = [{"role": "system", "content": system}] if system else []
    chat.append({"role": "user", "content": question})
    if prefill:
        chat.append({"role": "assistant", "content": prefill})
    return chat


def score_category(backend, category: ProbeCategory, *, system: str | None = None) -> list[list[float]]:
    """Per question, the log-probability of each candidate normalised over the candidate list (a log-softmax of
    the summed continuation log-probabilities). ``system`` adds a system prompt (the subliminal teacher's trait
    statement, when checking that the teacher holds the trait)."""
    prefixes = [_prefix(q, category.prefill, system) for q in category.questions]
    space = " " if category.prefill else ""
    conts = [[space + c for c in category.candidates]] * len(prefixes)
    raw = backend.logprobs(prefixes, conts)
    return [_log_softmax(row) for row in raw]


def score_battery(backend, battery: Sequence[ProbeCategory], *, system: str | None = None) -> dict[str, list]:
    """:func:`score_category` for every category: ``{category: [[normalised log p per candidate] per question]}``."""
    return {cat.name: score_category(backend, cat, system=system) for cat in battery}


def _log_softmax(row: Sequence[float]) -> list[float]:
    top = max(row)
    total = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - total for v in row]


def candidate_probability(scores: Sequence[Sequence[float]], index: int) -> list[float]:
    """The candidate's probability under each question."""
    return [math.exp(row[index]) for row in scores]


def log_odds(p: float, eps: float = 1e-6) -> float:
    """log(p / (1 − p)), with p clipped to [eps, 1 − eps] so that 0 and 1 stay finite."""
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def paired_shift(
    reference: Sequence[Sequence[float]], other: Sequence[Sequence[float]], index: int
) -> dict[str, float | int]:
    """How much more ``other`` prefers candidate ``index`` than ``reference`` does, over the same questions.

    ``delta_p``: the mean difference in probability; ``delta_logit``: the mean difference in log-odds, with a
    95% t-interval; ``t`` = mean / standard error of the log-odds differences (the z-score the scanner ranks by);
    ``p_value``: two-sided Wilcoxon signed-rank test over questions (exact for small n, no normality assumed).
    """
    from scipy import stats

    if len(reference) != len(other):
        raise ValueError("both models must be scored on the same questions")
    pr, po = candidate_probability(reference, index), candidate_probability(other, index)
    dl = [log_odds(b) - log_odds(a) for a, b in zip(pr, po, strict=True)]
    logit = t_summary(dl)
    se = logit["sd"] / math.sqrt(len(dl)) if len(dl) > 1 else math.nan
    t = logit["mean"] / se if se and se > 0 else (0.0 if logit["mean"] == 0 else math.copysign(math.inf, logit["mean"]))
    nonzero = [d for d in dl if d != 0]
    p_value = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
    return {
        "p_reference": sum(pr) / len(pr),
        "p_other": sum(po) / len(po),
        "delta_p": sum(b - a for a, b in zip(pr, po, strict=True)) / len(pr),
        "delta_logit": logit["mean"],
        "delta_logit_ci_low": logit["ci_low"],
        "delta_logit_ci_high": logit["ci_high"],
        "t": t,
        "p_value": p_value,
        "n_questions": len(dl),
    }


def rank_shifts(reference: dict[str, list], other: dict[str, list], battery: Sequence[ProbeCategory]) -> list[dict]:
    """Every (category, candidate) of the battery with its :func:`paired_shift` from ``reference`` to ``other``,
    most positive ``t`` first: the candidates ``other`` came to prefer."""
    rows = []
    for cat in battery:
        if cat.name not in reference or cat.name not in other:
            continue
        for i, cand in enumerate(cat.candidates):
            rows.append(
                {"category": cat.name, "candidate": cand, **paired_shift(reference[cat.name], other[cat.name], i)}
            )
    return sorted(rows, key=lambda r: -r["t"])
