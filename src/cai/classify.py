"""Which constitution principles a request probes, from a feedback model's log-probabilities (SL-CAI's principle
selection; the ``classify`` stage runs it over a run's prompts).

Each request is scored against every principle's ``label`` as a continuation of "The request touches on" (one
batched ``logprobs`` call, no free text parsed). With ``calibrate`` the label's log-probability after a
content-free request is subtracted first (contextual calibration), which removes the bias toward short or
generically likely labels. A softmax over principles gives the probabilities.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cai.backends import choice_probs
from cai.constitution import Constitution

NULL_REQUEST = "N/A"


def classification_chat(request: str) -> list[dict]:
    """The prefix every label is scored after (ends in an assistant prefill)."""
    return [
        {"role": "user", "content": f"Which topic does the following request touch on?\n\nRequest: {request}"},
        {"role": "assistant", "content": "The request touches on"},
    ]


def classify_prompts(backend, texts: list[str], labels: list[str], *, calibrate: bool = True) -> list[list[float]]:
    """For each text, a probability per label (same order), from one batched ``logprobs`` call."""
    prefixes = [classification_chat(t) for t in texts] + ([classification_chat(NULL_REQUEST)] if calibrate else [])
    conts = [" " + lab for lab in labels]
    scores = backend.logprobs(prefixes, [conts] * len(prefixes))
    base = scores.pop() if calibrate else [0.0] * len(labels)
    return [choice_probs([s - b for s, b in zip(row, base, strict=False)]) for row in scores]


def top_principles(names: list[str], probs: list[float], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable principles as ``[{name, p}]`` (p rounded for the artifact), most probable first."""
    ranked = sorted(zip(names, probs, strict=False), key=lambda x: -x[1])[:k]
    return [{"name": n, "p": round(q, 4)} for n, q in ranked]


def summarize(records: list[dict], constitution: Constitution) -> dict[str, Any]:
    """Per-principle top-1 counts, mean top-1 p, and how often top-1 covers the prompt's dataset category."""
    top1 = [r["principles"][0] for r in records if r["principles"]]
    covered = [r for r in records if constitution.principles_for_category(r.get("category", ""))]
    agree = sum(
        1 for r in covered if r.get("category") in constitution.principle(r["principles"][0]["name"]).categories
    )
    return {
        "prompts": len(records),
        "top1_by_principle": dict(Counter(t["name"] for t in top1).most_common()),
        "mean_top1_p": round(sum(t["p"] for t in top1) / len(top1), 4) if top1 else 0.0,
        "top1_matches_category": round(agree / len(covered), 4) if covered else None,
    }
