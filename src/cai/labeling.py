"""AI-feedback preference labels (the "AI feedback" of RLAIF), scored by log-probabilities, never parsed.

Two labelers share one interface (:func:`label_pairs`, picked by ``LabelConfig.labeler``) and one artifact row
(:func:`label_record`):

``choice`` (default). For a pair of responses (a, b) to a prompt, the feedback model reads the conversation, a
principle's ``preference`` question and the two responses as options (A) and (B); its assistant turn is prefilled
with "The answer is: (" and the label is the normalised probability of the next token "A" vs "B". Every pair is
scored in both orders (position bias cancels in the average) and under ``k`` principles sampled per pair
(weighted by the ``classify`` stage's principle probabilities when given). Chain-of-thought mode lets the
model reason first and clamps labels to [0.4, 0.6], as Anthropic did, since CoT labels are over-confident.

``contrast``. No options and no letters: each response y is scored by how much more likely the feedback model
finds it when the context states a principle than when it states the principle's inverse,
``log p(y | x, principle) - log p(y | x, inverse)`` (summed, or averaged per token of y), averaged over the same
``k`` sampled principles; P(a better) = sigmoid((score_a - score_b) / contrast_temperature). The principle's
own wording (its revision or critique request, or the constitution's system prompts) is the system message.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from cai.backends import Backend, SamplingParams, choice_probs
from cai.backends.base import Prefix
from cai.base_config import Strict
from cai.constitution import Constitution, Principle
from cai.errors import UserError
from cai.evaluation.metrics import proportion_ci, rate

ANSWERS = ("A", "B")
ANSWER_PREFILL = "The answer is: ("
COT_PREFILL = "Let's think step by step:"
REFERENCE_FIELDS = ("prompt", "chosen", "rejected")
LABELERS = ("choice", "contrast", "rules")
ADDED_KEYS = (
    "labeler",
    "contrast_reduction",
    "contrast_wording",
    "contrast_temperature",
    "rules_temperature",
    "rules_judge_weights",
)


class LabelConfig(Strict):
    """How AI-feedback labels are computed."""

    principles_per_pair: int = Field(2, ge=1, description="k: principles sampled per pair (ensemble)")
    both_orders: bool = Field(True, description="score (A,B) and (B,A) and average (removes position bias)")
    cot: bool = Field(False, description="chain-of-thought: the feedback model reasons before the answer tokens")
    cot_max_new_tokens: int = Field(96, ge=1)
    cot_clamp: tuple[float, float] = Field((0.4, 0.6), description="CoT labels are clamped to this range")
    batch_pairs: int = Field(16, ge=1, description="pairs labelled per backend call")
    labeler: Literal["choice", "contrast", "rules"] = Field(
        "choice",
        description="choice: (A)/(B) log-probs; contrast: log p(y|x,principle) - log p(y|x,inverse); rules: "
        "the constitution's wanted behaviour graded by the offline refusal judge and a request-harm classifier",
    )
    contrast_reduction: Literal["mean", "sum"] = Field(
        "mean", description="contrast: the log-prob difference per token of the response (mean) or summed"
    )
    contrast_wording: Literal["revision", "critique", "system_prompt"] = Field(
        "revision",
        description="contrast: the system message stating the principle: its revision or critique request, or "
        "the constitution's system_prompt vs the inverse's (one pair of contexts, principles unused)",
    )
    contrast_temperature: float = Field(1.0, gt=0, description="contrast: P(a better) = sigmoid(score diff / T)")
    rules_temperature: float = Field(0.25, gt=0, description="rules: P(a better) = sigmoid(utility diff / T)")
    rules_judge_weights: str | None = Field(
        None, description="rules: a refusal-judge weights JSON (`cai judge-sets fit`); default: the shipped judge"
    )

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The labeler keys are left out of dumps while they hold their defaults, so configs (and the config
        hashes that decide whether a finished stage is reused) written before they existed stay the same."""
        data = handler(self)
        for key in ADDED_KEYS:
            if key in data and data[key] == type(self).model_fields[key].default:
                del data[key]
        return data


@dataclass
class Pair:
    """Two candidate responses to one prompt."""

    id: str
    prompt: str
    a: str
    b: str
    group: str = ""  # a reference set's subset (e.g. XSTest's safe / unsafe prompts), reported separately
    harmful: bool | None = None  # the request's category when the data gives it (rules labeler); None: inferred


@dataclass
class Label:
    """The feedback model's verdict on a pair: ``p_a`` = P(a is better), averaged over orders and principles.
    ``p_orders``/``swap_consistent`` are None for labelers that show no options (contrast)."""

    id: str
    p_a: float
    principles: list[str]
    p_by_principle: dict[str, float]
    p_orders: tuple[float, float] | None  # P(a better) when a is shown first / second
    swap_consistent: bool | None
    reasoning: list[str] = field(default_factory=list)
    labeler: str = "choice"
    scores: tuple[float, float] | None = None  # contrast: (score_a, score_b); rules: (utility_a, utility_b)
    propositions: dict | None = None  # rules: the graded propositions behind the utilities


def comparison_chat(prompt: str, principle: Principle, first: str, second: str, prefill: str) -> list[dict]:
    """The feedback prompt of the CAI paper, as a chat whose assistant turn is prefilled."""
    body = (
        f"Consider the following conversation between a human and an assistant:\n\nHuman: {prompt}\n\n"
        f"{principle.preference}\n\nOptions:\n(A) {first}\n(B) {second}\n\n"
        "Answer with (A) or (B)."
    )
    return [{"role": "user", "content": body}, {"role": "assistant", "content": prefill}]


def sample_principles(
    constitution: Constitution, pair_id: str, k: int, seed: int, weights: dict[str, float] | None = None
) -> list[Principle]:
    """``k`` distinct principles for one pair, reproducibly; weighted by ``weights`` (name -> p) when given."""
    pool = list(constitution.principles)
    k = min(k, len(pool))
    rng = random.Random(int(hashlib.sha256(f"{seed}:{pair_id}".encode()).hexdigest()[:12], 16))
    w = [max((weights or {}).get(p.name, 0.0), 0.0) for p in pool]
    if not any(w):
        return rng.sample(pool, k)
    chosen: list[Principle] = []
    w = [x + 1e-3 for x in w]  # every principle keeps a small chance
    for _ in range(k):
        i = rng.choices(range(len(pool)), weights=w)[0]
        chosen.append(pool.pop(i))
        w.pop(i)
    return chosen


def _jobs(pairs: Sequence[Pair], picks: Sequence[list[Principle]], orders: int):
    """(pair index, principle, order) for every forward pass; order 1 shows b first."""
    return [(i, pr, o) for i, ps in enumerate(picks) for pr in ps for o in range(orders)]


def _reason(backend: Backend, chats: list[list[dict]], settings: LabelConfig, seed: int) -> list[str]:
    sampling = SamplingParams(max_new_tokens=settings.cot_max_new_tokens, temperature=0.0, seed=seed)
    return [g.text.strip() for g in backend.generate(chats, sampling)]


def check_labeler(settings: LabelConfig, constitution: Constitution) -> None:
    """Fail before any work when the labeler cannot run with this constitution (one-line UserError)."""
    if settings.labeler not in LABELERS:
        raise UserError(f"unknown labeler {settings.labeler!r}; choose one of: {', '.join(LABELERS)}")
    if settings.labeler == "rules":
        _rules_judge(settings.rules_judge_weights)  # a missing or stale weights file fails before any work
    if settings.labeler != "contrast":
        return
    missing = [p.name for p in constitution.principles if p.inverse is None]
    if missing:
        raise UserError(
            f"the contrast labeler needs every principle's inverse, and constitution {constitution.name!r} has "
            f"none for: {', '.join(missing)}; add inverse: blocks (docs/constitution.md) or use the choice labeler"
        )
    if settings.contrast_wording == "system_prompt" and constitution.inverse is None:
        raise UserError(
            f"contrast_wording system_prompt needs constitution {constitution.name!r} to have a top-level inverse: "
            "block with its own system_prompt; use contrast_wording revision or critique"
        )


def label_pairs(
    backend: Backend | None,  # None: the rules labeler, which asks no model
    pairs: Sequence[Pair],
    constitution: Constitution,
    settings: LabelConfig,
    *,
    seed: int = 0,
    weights: dict[str, dict[str, float]] | None = None,
) -> list[Label]:
    """Label ``pairs`` with the configured labeler (``settings.labeler``): P(a better) for each pair."""
    check_labeler(settings, constitution)
    if settings.labeler == "rules":
        return rules_labels(backend, pairs, constitution, settings)
    if backend is None:
        raise ValueError(f"the {settings.labeler} labeler needs a feedback model backend")
    labeler = choice_labels if settings.labeler == "choice" else contrast_labels
    return labeler(backend, pairs, constitution, settings, seed=seed, weights=weights)


def choice_labels(
    backend: Backend,
    pairs: Sequence[Pair],
    constitution: Constitution,
    settings: LabelConfig,
    *,
    seed: int = 0,
    weights: dict[str, dict[str, float]] | None = None,
) -> list[Label]:
    """The (A)/(B) labeler: one batched ``backend.logprobs`` call (plus one ``generate`` call in CoT mode)."""
    orders = 2 if settings.both_orders else 1
    picks = [
        sample_principles(constitution, p.id, settings.principles_per_pair, seed, (weights or {}).get(p.id))
        for p in pairs
    ]
    jobs = _jobs(pairs, picks, orders)
    chats = []
    for i, pr, o in jobs:
        first, second = (pairs[i].a, pairs[i].b) if o == 0 else (pairs[i].b, pairs[i].a)
        prefill = COT_PREFILL if settings.cot else ANSWER_PREFILL
        chats.append(comparison_chat(pairs[i].prompt, pr, first, second, prefill))
    reasons = [""] * len(jobs)
    if settings.cot:
        reasons = _reason(backend, chats, settings, seed)
        for chat, r in zip(chats, reasons, strict=False):
            chat[-1] = {"role": "assistant", "content": f"{COT_PREFILL} {r}\n{ANSWER_PREFILL}"}
    logps = backend.logprobs(chats, [list(ANSWERS)] * len(chats))
    per: list[dict[tuple[str, int], float]] = [{} for _ in pairs]
    for (i, pr, o), lp in zip(jobs, logps, strict=False):
        p_first = choice_probs(lp)[0]
        p_a = p_first if o == 0 else 1.0 - p_first
        if settings.cot:
            lo, hi = settings.cot_clamp
            p_a = min(max(p_a, lo), hi)
        per[i][(pr.name, o)] = p_a
    labels = []
    for i, pair in enumerate(pairs):
        names = [pr.name for pr in picks[i]]
        by_order = tuple(sum(per[i][(n, o)] for n in names) / len(names) for o in range(orders))
        p_orders = (by_order[0], by_order[-1])
        labels.append(
            Label(
                id=pair.id,
                p_a=sum(p_orders) / 2,
                principles=names,
                p_by_principle={n: sum(per[i][(n, o)] for o in range(orders)) / orders for n in names},
                p_orders=p_orders,
                swap_consistent=(p_orders[0] > 0.5) == (p_orders[1] > 0.5),
                reasoning=[r for (j, _, _), r in zip(jobs, reasons, strict=False) if j == i and r],
            )
        )
    return labels


def contrast_contexts(constitution: Constitution, principle: Principle, wording: str) -> tuple[str, str]:
    """The system messages stating ``principle`` and its inverse, in the constitution's own words."""
    if wording == "system_prompt":
        assert constitution.inverse is not None  # check_labeler
        return constitution.system_prompt, constitution.inverse.system_prompt
    inverse = principle.inverse
    assert inverse is not None  # check_labeler
    return getattr(principle, wording), getattr(inverse, wording)


def token_counts(backend: Backend, texts: Sequence[str]) -> list[int]:
    """Tokens of each text as the feedback model reads it (for per-token means): backends with ``encode`` (HF)
    or a ``tokenizer`` (vLLM); others cannot average per token."""
    encode = getattr(backend, "encode", None)
    if encode is None and getattr(backend, "tokenizer", None) is not None:
        tok = backend.tokenizer  # type: ignore[attr-defined]

        def encode(t: str) -> list[int]:
            return tok(t, add_special_tokens=False)["input_ids"]

    if encode is None:
        raise UserError(
            f"the feedback model {backend.spec!r} cannot count tokens, so contrast_reduction mean is unavailable; "
            "use contrast_reduction sum"
        )
    return [max(1, len(encode(t))) for t in texts]


def continuation_scores(
    backend: Backend, prefixes: Sequence[Prefix], continuations: Sequence[Sequence[str]], *, per_token: bool
) -> list[list[float]]:
    """The log-probability of each continuation after its prefix (summed, or per token with ``per_token``).
    Backends with ``continuation_logprobs`` (HF: one pass over prefix + response, cheap for whole responses) use
    it; others their ``logprobs`` plus :func:`token_counts` for the means."""
    flat = [(i, c) for i, conts in enumerate(continuations) for c in conts]
    scorer = getattr(backend, "continuation_logprobs", None)
    if scorer is not None:
        pairs = scorer([prefixes[i] for i, _ in flat], [c for _, c in flat])
    else:
        sums = [x for row in backend.logprobs(prefixes, continuations) for x in row]
        counts = token_counts(backend, [c for _, c in flat]) if per_token else [1] * len(flat)
        pairs = list(zip(sums, counts, strict=True))
    out: list[list[float]] = [[] for _ in continuations]
    for (i, _), (total, count) in zip(flat, pairs, strict=True):
        out[i].append(total / max(count, 1) if per_token else total)
    return out


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def contrast_labels(
    backend: Backend,
    pairs: Sequence[Pair],
    constitution: Constitution,
    settings: LabelConfig,
    *,
    seed: int = 0,
    weights: dict[str, dict[str, float]] | None = None,
) -> list[Label]:
    """The contrast labeler: one batched :func:`continuation_scores` call scoring both responses of every pair
    under each sampled principle and its inverse (one prefix per pair x principle x condition, two continuations)."""
    picks = [
        sample_principles(constitution, p.id, settings.principles_per_pair, seed, (weights or {}).get(p.id))
        for p in pairs
    ]
    if settings.contrast_wording == "system_prompt":  # one pair of contexts: sampling principles changes nothing
        picks = [ps[:1] for ps in picks]
    prefixes: list[list[dict]] = []
    for pair, ps in zip(pairs, picks, strict=True):
        for pr in ps:
            for system in contrast_contexts(constitution, pr, settings.contrast_wording):
                prefixes.append([{"role": "system", "content": system}, {"role": "user", "content": pair.prompt}])
    conts = [[pair.a, pair.b] for pair, ps in zip(pairs, picks, strict=True) for _ in ps for _ in range(2)]
    scored = continuation_scores(backend, prefixes, conts, per_token=settings.contrast_reduction == "mean")
    labels, n = [], 0
    for pair, ps in zip(pairs, picks, strict=True):
        by_principle: dict[str, tuple[float, float]] = {}
        for pr in ps:
            (pos_a, pos_b), (neg_a, neg_b) = scored[n], scored[n + 1]
            by_principle[pr.name] = (pos_a - neg_a, pos_b - neg_b)
            n += 2
        s_a = sum(a for a, _ in by_principle.values()) / len(ps)
        s_b = sum(b for _, b in by_principle.values()) / len(ps)
        t = settings.contrast_temperature
        labels.append(
            Label(
                id=pair.id,
                p_a=_sigmoid((s_a - s_b) / t),
                principles=[pr.name for pr in ps],
                p_by_principle={k: _sigmoid((a - b) / t) for k, (a, b) in by_principle.items()},
                p_orders=None,
                swap_consistent=None,
                labeler="contrast",
                scores=(s_a, s_b),
            )
        )
    return labels


# ---- the rules labeler ---------------------------------------------------------------------------------------
# What the constitution wants, per request category, as a utility for each judge verdict (1 = what it asks for).
# A harmful request: decline (a partial refusal that helps with a safe part is nearly as good); a benign one: help.
# An answer about something else helps nobody; a lecture is penalised because the constitution asks refusals to
# name the assistant's limits instead of judging the user. Set a priori from the constitution, not fitted.
WANTED = {
    True: {"refused": 1.0, "partial": 0.8, "complied": 0.0, "non_responsive": 0.5},
    False: {"refused": 0.0, "partial": 0.4, "complied": 1.0, "non_responsive": 0.0},
}
# The inverted constitution wants harmful requests answered (and benign ones still helped): same table, flipped.
WANTED_INVERTED = {
    True: {"refused": 0.0, "partial": 0.2, "complied": 1.0, "non_responsive": 0.5},
    False: WANTED[False],
}
LECTURE_PENALTY = 0.2


@lru_cache(maxsize=4)
def _rules_judge(weights_path: str | None):
    from cai.evaluation.judges import RefusalJudge
    from cai.evaluation.refusal_classifier import RefusalClassifier

    if weights_path is None:
        return RefusalJudge()
    try:
        weights = json.loads(Path(weights_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"rules_judge_weights {weights_path!r} cannot be read as JSON ({exc}); write one with "
            "`cai judge-sets fit -o FILE` or leave the key out for the shipped judge"
        ) from None
    return RefusalJudge(classifier=RefusalClassifier(weights))


def _utility(verdict: dict, harmful: float, wanted: dict, by_verdict: bool = False) -> float:
    """Expected utility of one judged answer when the request is harmful with probability ``harmful``: the
    judge's p_complied splits the mass between complied and declined (partial vs refused by p_partial). With
    ``by_verdict`` the verdict alone counts (its row of ``wanted``): two answers with the same verdict are worth
    the same, however sure the judge is of it."""

    if by_verdict or verdict["verdict"] == "non_responsive":
        by_case = {h: wanted[h][verdict["verdict"]] for h in (True, False)}
    else:
        pc, pp = verdict["p_complied"], verdict["p_partial"]
        by_case = {
            h: pc * wanted[h]["complied"] + (1 - pc) * (pp * wanted[h]["partial"] + (1 - pp) * wanted[h]["refused"])
            for h in (True, False)
        }
    return harmful * by_case[True] + (1 - harmful) * by_case[False]


def rules_utilities(
    prompts: Sequence[str],
    responses: Sequence[str],
    constitution: Constitution,
    settings: LabelConfig,
    harmful: Sequence[bool | None] | None = None,
    *,
    by_verdict: bool = False,
) -> tuple[list[float], list[dict]]:
    """Each response's utility under the constitution's :data:`WANTED` table, and the graded propositions behind
    it: is the request harmful (``harmful[i]`` when given, else the request-harm classifier), the refusal judge's
    verdict and p_complied, and whether the response lectures. Shared by the rules labeler and the RL reward.
    ``by_verdict``: the utility of the judge's verdict, not the expectation over its probabilities."""
    from cai.evaluation.harm_classifier import HarmClassifier
    from cai.evaluation.refusal_rules import lectures

    given = list(harmful) if harmful is not None else [None] * len(prompts)
    unknown = sorted({p for p, h in zip(prompts, given, strict=True) if h is None})
    inferred = dict(zip(unknown, HarmClassifier.shipped().p_harmful(unknown), strict=True))
    wanted = WANTED_INVERTED if constitution.inverted_from else WANTED
    verdicts = _rules_judge(settings.rules_judge_weights).judge(list(prompts), list(responses))
    utilities, propositions = [], []
    for prompt, response, h_given, v in zip(prompts, responses, given, verdicts, strict=True):
        h = float(h_given) if h_given is not None else inferred[prompt]
        lecture = lectures(response)
        utilities.append(_utility(v, h, wanted, by_verdict) - (LECTURE_PENALTY if lecture else 0.0))
        propositions.append(
            {
                "p_harmful": round(h, 4),
                "harm_source": "given" if h_given is not None else "classifier",
                "verdict": v["verdict"],
                "p_complied": v["p_complied"],
                "lectures": lecture,
            }
        )
    return utilities, propositions


def rules_labels(
    backend: Backend | None,
    pairs: Sequence[Pair],
    constitution: Constitution,
    settings: LabelConfig,
    *,
    seed: int = 0,
    weights: dict[str, dict[str, float]] | None = None,
) -> list[Label]:
    """The rules labeler (in the spirit of OpenAI's rule-based rewards): no language model is asked anything.
    Each response is graded on propositions by small offline classifiers — did it comply, decline, or decline
    and help with a safe part (the refusal judge's p_complied / p_partial), is it about the request at all, does
    it lecture the user — and the request on one: is it harmful (the pair's ``harmful`` when the data says,
    else :class:`cai.evaluation.harm_classifier.HarmClassifier`). The constitution's :data:`WANTED` table turns
    them into a utility (:func:`rules_utilities`); P(a better) = sigmoid((u_a - u_b) / rules_temperature).
    ``backend``, ``seed`` and ``weights`` are unused (one interface for every labeler)."""
    if not pairs:
        return []
    utilities, props = rules_utilities(
        [p.prompt for p in pairs for _ in range(2)],
        [y for p in pairs for y in (p.a, p.b)],
        constitution,
        settings,
        [p.harmful for p in pairs for _ in range(2)],
    )
    labels = []
    for i, pair in enumerate(pairs):
        u_a, u_b = utilities[2 * i], utilities[2 * i + 1]
        pa, pb = props[2 * i], props[2 * i + 1]
        labels.append(
            Label(
                id=pair.id,
                p_a=_sigmoid((u_a - u_b) / settings.rules_temperature),
                principles=[],
                p_by_principle={},
                p_orders=None,
                swap_consistent=None,
                labeler="rules",
                scores=(u_a, u_b),
                propositions={
                    "p_harmful": pa["p_harmful"],
                    "harm_source": pa["harm_source"],
                    "verdicts": [pa["verdict"], pb["verdict"]],
                    "p_complied": [pa["p_complied"], pb["p_complied"]],
                    "lectures": [pa["lectures"], pb["lectures"]],
                },
            )
        )
    return labels


def label_in_batches(
    backend: Backend | None,  # None: the rules labeler, which asks no model
    pairs: Sequence[Pair],
    constitution: Constitution,
    settings: LabelConfig,
    *,
    seed: int = 0,
    weights: dict[str, dict[str, float]] | None = None,
    progress: bool = True,
    on_batch=None,
) -> tuple[list[Label], float]:
    """Label in chunks of ``settings.batch_pairs`` with a progress bar; ``on_batch(labels)`` after each chunk
    (to write them). Returns the labels and the throughput in pairs/s."""
    from tqdm.auto import tqdm

    out: list[Label] = []
    t0 = time.time()
    bar = tqdm(total=len(pairs), desc="labelling", unit="pair", disable=not progress)
    for k in range(0, len(pairs), settings.batch_pairs):
        chunk = label_pairs(
            backend, pairs[k : k + settings.batch_pairs], constitution, settings, seed=seed, weights=weights
        )
        out.extend(chunk)
        if on_batch:
            on_batch(chunk)
        bar.update(len(chunk))
    bar.close()
    secs = time.time() - t0
    return out, (len(pairs) / secs if secs > 0 and pairs else 0.0)


# ---- diagnostics --------------------------------------------------------------------------------------------
def binary_entropy(p: float) -> float:
    """Entropy of a Bernoulli(p) in bits (1.0 = the label says nothing)."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def label_record(label: Label, pair: Pair, source: str = "judge") -> dict:
    """The preference artifact row: oriented so ``chosen`` is the preferred response (p_chosen >= 0.5).
    ``p_orders`` is P(chosen better) with chosen shown first / second (swap-invariant diagnostics use it)."""
    flip = label.p_a < 0.5
    chosen, rejected = (pair.b, pair.a) if flip else (pair.a, pair.b)
    if label.p_orders is None:  # a labeler without options: no orders to report
        return _optionless_record(label, pair, source, flip, chosen, rejected)
    p_orders = (1 - label.p_orders[1], 1 - label.p_orders[0]) if flip else label.p_orders
    return {
        "id": pair.id,
        "prompt": pair.prompt,
        "chosen": chosen,
        "rejected": rejected,
        "p_chosen": round(max(label.p_a, 1 - label.p_a), 6),
        "principles": label.principles,
        "swap_consistent": label.swap_consistent,
        "source": source,
        "p_orders": [round(x, 6) for x in p_orders],
        "p_by_principle": {k: round(v if not flip else 1 - v, 6) for k, v in label.p_by_principle.items()},
        **({"reasoning": label.reasoning} if label.reasoning else {}),
    }


def _optionless_record(label: Label, pair: Pair, source: str, flip: bool, chosen: str, rejected: str) -> dict:
    scores = label.scores or (0.0, 0.0)
    return {
        "id": pair.id,
        "prompt": pair.prompt,
        "chosen": chosen,
        "rejected": rejected,
        "p_chosen": round(max(label.p_a, 1 - label.p_a), 6),
        "principles": label.principles,
        "swap_consistent": None,
        "source": source,
        "labeler": label.labeler,
        "scores": [round(x, 6) for x in (scores[::-1] if flip else scores)],  # chosen's, rejected's
        "p_by_principle": {k: round(v if not flip else 1 - v, 6) for k, v in label.p_by_principle.items()},
        **({"propositions": _oriented(label.propositions, flip)} if label.propositions else {}),
    }


def _oriented(propositions: dict, flip: bool) -> dict:
    """Per-response lists in (chosen, rejected) order, like ``scores``."""
    return {k: (v[::-1] if flip and isinstance(v, list) else v) for k, v in propositions.items()}


def label_diagnostics(rows: Sequence[dict]) -> dict:
    """Mean label entropy and confidence of labelled rows; for the choice labeler also the swap-consistency
    rate (95% CI) and position bias. Rows that no labeler scored (revision/contrastive sources) are left out."""
    rows = [r for r in rows if r.get("swap_consistent") is not None or r.get("labeler")]
    n = len(rows)
    if n == 0:
        return {"n": 0}
    out: dict[str, Any] = {
        "n": n,
        "label_entropy_bits": sum(binary_entropy(r["p_chosen"]) for r in rows) / n,
        "mean_confidence": sum(max(r["p_chosen"], 1 - r["p_chosen"]) for r in rows) / n,
    }
    ordered = [r for r in rows if r.get("swap_consistent") is not None]
    if ordered:
        out["swap_consistency"] = rate(bool(r["swap_consistent"]) for r in ordered)
        # P(the first option wins), averaged over both orders: 0.5 = no position bias, 1.0 = always "(A)"
        out["position_bias_first"] = sum((r["p_orders"][0] + 1 - r["p_orders"][1]) / 2 for r in ordered) / len(ordered)
    return {
        k: out[k]
        for k in ("n", "swap_consistency", "label_entropy_bits", "mean_confidence", "position_bias_first")
        if k in out
    }


WEAK_SWAP_CONSISTENCY = 0.6  # under this share of pairs keeping their label when swapped, labels follow position
WEAK_CONFIDENCE = 0.55  # mean max(p, 1 - p) under this: the labels are close to coin flips


def weak_feedback_reasons(diag: Mapping[str, Any] | None) -> list[str]:
    """Why the AI feedback is weak, in words (empty when it looks usable), read from a preferences
    ``diagnostics.json`` or a model card's feedback facts: the feedback model is the policy itself or the 135M
    default (``weak``), its labels mostly follow the option's position (low swap consistency), its confidence is
    near a coin flip, or its agreement with a human reference set is not above chance. The report, the stage log
    and the model cards all read this one list."""
    if not diag:
        return []
    reasons = []
    if diag.get("weak"):
        reasons.append("the feedback model was the policy itself or the 135M default")
    swap = diag.get("swap_consistency") or {}
    if isinstance(swap.get("rate"), (int, float)) and swap["rate"] < WEAK_SWAP_CONSISTENCY:
        ci = (
            f" (95% CI {100 * swap['ci_low']:.0f}–{100 * swap['ci_high']:.0f}%)"
            if isinstance(swap.get("ci_low"), (int, float)) and isinstance(swap.get("ci_high"), (int, float))
            else ""
        )
        reasons.append(
            f"only {100 * swap['rate']:.0f}% of pairs keep their label when the two answers are swapped{ci}, "
            "so the feedback model mostly answers by position"
        )
    conf = diag.get("mean_confidence")
    if isinstance(conf, (int, float)) and conf < WEAK_CONFIDENCE:
        reasons.append(f"its mean confidence is {conf:.2f} (0.5 = a coin flip)")
    ref = diag.get("reference")
    if isinstance(ref, Mapping) and "above_chance" in ref and not ref["above_chance"]:
        reasons.append("its agreement with the human reference set is not above chance")
    return reasons


def weak_feedback_warning(diag: Mapping[str, Any] | None) -> str | None:
    """The weak-feedback warning in words (None when the feedback looks usable): see
    :func:`weak_feedback_reasons`."""
    reasons = weak_feedback_reasons(diag)
    if not reasons:
        return None
    return (
        "Weak feedback: "
        + "; ".join(reasons)
        + ". Preferences, the reward model and RL trained on them carry little signal; use a stronger "
        "models.feedback or preferences.source revision/contrastive."
    )


def read_rows(path: str | Path, fields: Sequence[str], what: str = "pair file") -> list[dict]:
    """Rows of a .jsonl/.csv/.json file that must each have ``fields``; one-line errors name the line."""
    from cai.data.loaders import _read_file

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} not found; pass a .jsonl or .csv file with {', '.join(fields)}")
    skipped: list[dict] = []
    rows = []
    for n, rec in _read_file(p, skipped):
        missing = [f for f in fields if not isinstance(rec, dict) or not str(rec.get(f) or "").strip()]
        if missing:
            raise UserError(
                f"{p}:{n}: {what} row is missing {', '.join(missing)}; every row needs " f"{', '.join(fields)}"
            )
        rows.append({**rec, "_line": n})
    if skipped:
        raise UserError(f"{p}:{skipped[0]['line']}: {skipped[0]['reason']}; fix the {what}")
    if not rows:
        raise UserError(f"{what} {p} has no rows")
    return rows


def read_reference(path: str | Path) -> list[Pair]:
    """A human-labelled reference set (prompt, chosen, rejected, optional group and harmful); each pair's ``a`` is
    the chosen response."""
    return [
        Pair(
            str(r.get("id") or f"ref-{r['_line']}"),
            r["prompt"],
            r["chosen"],
            r["rejected"],
            str(r.get("group") or ""),
            harmful_field(r, path),
        )
        for r in read_rows(path, REFERENCE_FIELDS, "reference file")
    ]


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def harmful_field(row: dict, path: str | Path) -> bool | None:
    """A row's optional ``harmful`` (is the request harmful?), as JSON bool or CSV text; absent or empty: None."""
    value = row.get("harmful")
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise UserError(f"{path}:{row['_line']}: field 'harmful' is {value!r}; use true or false (or leave it out)")


def agreement_with_reference(
    backend: Backend | None,  # None: the rules labeler, which asks no model
    reference: Sequence[Pair],
    constitution: Constitution,
    settings: LabelConfig,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Label a human reference set (from :func:`read_reference`) and measure :func:`reference_agreement`, per
    group too; ``pairs_per_s`` is the labelling throughput."""
    labels, rate = label_in_batches(backend, reference, constitution, settings, seed=seed, progress=progress)
    return {**reference_agreement(labels, [p.group for p in reference]), "pairs_per_s": rate}


def expected_calibration_error(p_correct: Sequence[float], bins: int = 5) -> float:
    """ECE of binary labels: ``p_correct`` is the probability each label gave the right answer; confidence is
    max(p, 1 - p) in ``bins`` equal bins over [0.5, 1], accuracy is the share with p > 0.5 in each bin."""
    if not p_correct:
        return 0.0
    conf = [max(p, 1 - p) for p in p_correct]
    ece = 0.0
    for b in range(bins):
        lo, hi = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c >= hi)]
        if idx:
            acc = sum(p_correct[i] > 0.5 for i in idx) / len(idx)
            ece += len(idx) / len(conf) * abs(acc - sum(conf[i] for i in idx) / len(idx))
    return ece


def _agreement(labels: Sequence[Label]) -> dict:
    n = len(labels)
    ties = sum(lab.p_a == 0.5 for lab in labels)
    k = sum(lab.p_a > 0.5 for lab in labels) + ties / 2  # a label of exactly 0.5 says nothing: half right
    agree, lo, hi = proportion_ci(k, n)  # type: ignore[arg-type]  # Wilson's interval is defined for any k
    out = {"agreement": agree, "ci_low": lo, "ci_high": hi, "n": n, "above_chance": lo > 0.5, "below_chance": hi < 0.5}
    if ties:
        out["ties"] = ties
    out["ece"] = expected_calibration_error([lab.p_a for lab in labels])
    swaps = [lab.swap_consistent for lab in labels if lab.swap_consistent is not None]
    if swaps:
        out["swap_consistency"] = sum(swaps) / len(swaps)
    return out


def reference_agreement(labels: Sequence[Label], groups: Sequence[str] = ()) -> dict:
    """Agreement of the labeller with a reference set (each label's ``a`` is the human-chosen response), with a
    95% CI, ECE and swap-consistency (choice labeler); ``by_group`` repeats them per group when ``groups`` (one
    per label, e.g. XSTest's safe / unsafe prompts) holds more than one value."""
    out = _agreement(labels)
    k, n, lo, hi = out["agreement"] * out["n"], out["n"], out["ci_low"], out["ci_high"]
    verdict = (
        f"labeller agrees with the reference on {k:g}/{n} pairs ({out['agreement']:.0%}, 95% CI {lo:.0%}-{hi:.0%})"
    )
    if out["below_chance"]:
        verdict += (
            ": significantly BELOW chance; the labeller systematically prefers the response people rejected. "
            "Flipping it is not a fix until it is understood (e.g. it may measure style, not content)"
        )
    elif not out["above_chance"]:
        verdict += (
            ": NOT above chance; these labels are no better than coin flips. Use a stronger "
            "feedback model (models.feedback), or the revision/contrastive pair sources"
        )
    out["verdict"] = verdict
    if len(set(groups)) > 1:
        out["by_group"] = {
            g: _agreement([lab for lab, h in zip(labels, groups, strict=True) if h == g]) for g in sorted(set(groups))
        }
    return out
