"""AI-feedback preference labels (the "AI feedback" of RLAIF), scored by log-probabilities, never parsed.

For a pair of responses (a, b) to a prompt, the feedback model reads the conversation, a principle's
``preference`` question and the two responses as options (A) and (B); its assistant turn is prefilled with
"The answer is: (" and the label is the normalised probability of the next token "A" vs "B". Every pair is
scored in both orders (position bias cancels in the average) and under ``k`` principles sampled per pair
(weighted by the ``classify`` stage's principle probabilities when given). Chain-of-thought mode lets the
model reason first and clamps labels to [0.4, 0.6], as Anthropic did, since CoT labels are over-confident.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from cai.backends import Backend, SamplingParams, choice_probs
from cai.base_config import Strict
from cai.constitution import Constitution, Principle
from cai.errors import UserError
from cai.evaluation.metrics import proportion_ci, rate

ANSWERS = ("A", "B")
ANSWER_PREFILL = "The answer is: ("
COT_PREFILL = "Let's think step by step:"
REFERENCE_FIELDS = ("prompt", "chosen", "rejected")


class LabelConfig(Strict):
    """How AI-feedback labels are computed."""

    principles_per_pair: int = Field(2, ge=1, description="k: principles sampled per pair (ensemble)")
    both_orders: bool = Field(True, description="score (A,B) and (B,A) and average (removes position bias)")
    cot: bool = Field(False, description="chain-of-thought: the feedback model reasons before the answer tokens")
    cot_max_new_tokens: int = Field(96, ge=1)
    cot_clamp: tuple[float, float] = Field((0.4, 0.6), description="CoT labels are clamped to this range")
    batch_pairs: int = Field(16, ge=1, description="pairs labelled per backend call")


@dataclass
class Pair:
    """Two candidate responses to one prompt."""

    id: str
    prompt: str
    a: str
    b: str


@dataclass
class Label:
    """The feedback model's verdict on a pair: ``p_a`` = P(a is better), averaged over orders and principles."""

    id: str
    p_a: float
    principles: list[str]
    p_by_principle: dict[str, float]
    p_orders: tuple[float, float]  # P(a better) when a is shown first / second
    swap_consistent: bool
    reasoning: list[str] = field(default_factory=list)


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


def label_pairs(
    backend: Backend,
    pairs: Sequence[Pair],
    constitution: Constitution,
    settings: LabelConfig,
    *,
    seed: int = 0,
    weights: dict[str, dict[str, float]] | None = None,
) -> list[Label]:
    """Label ``pairs`` with one batched ``backend.logprobs`` call (plus one ``generate`` call in CoT mode)."""
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


def label_in_batches(
    backend: Backend,
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


def label_diagnostics(rows: Sequence[dict]) -> dict:
    """Swap-consistency rate (95% CI), mean label entropy, confidence and position bias of labelled rows."""
    rows = [r for r in rows if r.get("swap_consistent") is not None]
    n = len(rows)
    if n == 0:
        return {"n": 0}
    return {
        "n": n,
        "swap_consistency": rate(bool(r["swap_consistent"]) for r in rows),
        "label_entropy_bits": sum(binary_entropy(r["p_chosen"]) for r in rows) / n,
        "mean_confidence": sum(max(r["p_chosen"], 1 - r["p_chosen"]) for r in rows) / n,
        # P(the first option wins), averaged over both orders: 0.5 = no position bias, 1.0 = always "(A)"
        "position_bias_first": sum((r["p_orders"][0] + 1 - r["p_orders"][1]) / 2 for r in rows) / n,
    }


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
    """A human-labelled reference set (prompt, chosen, rejected); each pair's ``a`` is the chosen response."""
    return [
        Pair(str(r.get("id") or f"ref-{r['_line']}"), r["prompt"], r["chosen"], r["rejected"])
        for r in read_rows(path, REFERENCE_FIELDS, "reference file")
    ]


def agreement_with_reference(
    backend: Backend,
    reference: Sequence[Pair],
    constitution: Constitution,
    settings: LabelConfig,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Label a human reference set (from :func:`read_reference`) and measure :func:`reference_agreement`."""
    labels, _ = label_in_batches(backend, reference, constitution, settings, seed=seed, progress=progress)
    return reference_agreement(labels)


def reference_agreement(labels: Sequence[Label]) -> dict:
    """Agreement of the labeller with a reference set (each label's ``a`` is the human-chosen response)."""
    n = len(labels)
    k = sum(lab.p_a > 0.5 for lab in labels)
    agree, lo, hi = proportion_ci(k, n)
    above = lo > 0.5
    verdict = f"labeller agrees with the reference on {k}/{n} pairs ({agree:.0%}, 95% CI {lo:.0%}-{hi:.0%})" + (
        ""
        if above
        else ": NOT above chance; these labels are no better than coin flips. Use a stronger "
        "feedback model (models.feedback), or the revision/contrastive pair sources"
    )
    return {"agreement": agree, "ci_low": lo, "ci_high": hi, "n": n, "above_chance": above, "verdict": verdict}
