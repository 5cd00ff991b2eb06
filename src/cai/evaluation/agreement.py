"""How well a judge agrees with human labels: confusion matrices, per-class precision / recall / F1 and accuracy,
each with a 95% interval, for the 4-way verdict and for the binary "refused vs not" view (``cai judge
--label-field``), plus the ``--label-map`` that maps a dataset's own label names onto our verdicts.

Intervals: accuracy, precision and recall are proportions with Wilson score intervals. F1 is not a proportion;
its interval comes from the Wilson interval of the Jaccard index J = TP / (TP + FP + FN) (the share of true
positives among the items either side calls positive) mapped through the monotone F1 = 2J / (1 + J).
Undefined values (no item in a denominator) are ``None``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai.errors import UserError
from cai.evaluation.metrics import REFUSING, VERDICTS, proportion_ci

BINARY = ("refused", "not refused")  # refused = verdict refused or partial, the legacy ``refused`` bool
_TRUE = {"true", "1", "yes", "refused", "refusal"}
_FALSE = {"false", "0", "no", "complied", "compliance"}


def label_key(value: Any) -> str | None:
    """A label value as the string ``--label-map`` keys are compared with: JSON/YAML booleans as ``true`` /
    ``false``, integral numbers without a decimal point (``1``, also for ``1.0``), text stripped; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_label_map(text: str) -> dict[str, str]:
    """``--label-map``: inline ``LABEL=VERDICT,LABEL=VERDICT`` or a path to a JSON/YAML file holding the same
    mapping. Keys are compared as strings (:func:`label_key`); values must be verdicts. UserError otherwise."""
    p = Path(text)
    items: list[tuple[str | None, str | None, str]]  # (dataset label, verdict, the entry as written)
    looks_like_file = p.suffix.lower() in (".json", ".yaml", ".yml")
    if looks_like_file or ("=" not in text and p.is_file()):
        if not p.is_file():
            raise UserError(f"--label-map {text}: file not found")
        import yaml

        raw = p.read_text(encoding="utf-8-sig")
        try:
            # YAML scalars stay text (BaseLoader): keys are compared as strings, and YAML's 1 and true would
            # otherwise collide as Python dict keys
            data = json.loads(raw) if p.suffix.lower() == ".json" else yaml.load(raw, Loader=yaml.BaseLoader)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise UserError(
                f"--label-map {text}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        if not isinstance(data, dict) or not data:
            raise UserError(f"--label-map {text}: expected a non-empty mapping of dataset label -> verdict")
        items = [(label_key(k), label_key(v), f"{k}: {v}") for k, v in data.items()]
        where = f"--label-map {text}"
    else:
        items = []
        for part in (x for x in text.split(",") if x.strip()):
            if "=" not in part:
                raise UserError(
                    f"--label-map: {part.strip()!r} is not LABEL=VERDICT; write e.g. "
                    "'1_full_compliance=complied,2_full_refusal=refused' or pass a JSON/YAML file"
                )
            label, verdict_text = part.split("=", 1)
            items.append((label.strip(), verdict_text.strip(), part.strip()))
        where = "--label-map"
        if not items:
            raise UserError("--label-map is empty; write e.g. '1=complied,0=refused' or pass a JSON/YAML file")
    out: dict[str, str] = {}
    for k, v, shown in items:
        if not k:
            raise UserError(f"{where}: entry {shown!r} has an empty label")
        verdict = (v or "").lower()
        if verdict not in VERDICTS:
            raise UserError(
                f"{where}: entry {shown!r} maps to {v!r}, which is not a verdict " f"({', '.join(VERDICTS)})"
            )
        out[k] = verdict
    return out


def map_label(value: Any, label_map: dict[str, str] | None) -> str | bool | None:
    """A human label as a verdict (str), a refused/not bool (``true``/``false``-like values without a map), or
    None when it cannot be read (absent, or outside the map / the vocabulary)."""
    key = label_key(value)
    if key is None or key == "":
        return None
    if label_map is not None:
        if key in label_map:
            return label_map[key]
        folded = {k.casefold(): v for k, v in label_map.items()}
        return folded.get(key.casefold())
    low = key.lower()
    if low in VERDICTS:
        return low
    return True if low in _TRUE else False if low in _FALSE else None


def _share(k: int, n: int) -> dict:
    if n <= 0:
        return {"value": None, "ci_low": None, "ci_high": None, "k": k, "n": n}
    p, lo, hi = proportion_ci(k, n)
    return {"value": p, "ci_low": lo, "ci_high": hi, "k": k, "n": n}


def _f1(tp: int, fp: int, fn: int) -> dict:
    n = tp + fp + fn
    if n <= 0:
        return {"value": None, "ci_low": None, "ci_high": None}
    _, lo, hi = proportion_ci(tp, n)  # Jaccard index J with its Wilson interval
    return {"value": 2 * tp / (2 * tp + fp + fn), "ci_low": 2 * lo / (1 + lo), "ci_high": 2 * hi / (1 + hi)}


def confusion_report(truth: Sequence[str], pred: Sequence[str], classes: Sequence[str]) -> dict:
    """Confusion matrix (rows = human labels, columns = judge verdicts, in ``classes`` order), accuracy and
    per-class precision / recall / F1 with 95% intervals (see the module docstring)."""
    if len(truth) != len(pred):
        raise ValueError("truth and pred must have the same length")
    idx = {c: i for i, c in enumerate(classes)}
    m = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, pred, strict=False):
        m[idx[t]][idx[p]] += 1
    per_class = {}
    for c, i in idx.items():
        tp = m[i][i]
        fp = sum(m[r][i] for r in range(len(classes))) - tp
        fn = sum(m[i]) - tp
        per_class[c] = {
            "support": tp + fn,
            "predicted": tp + fp,
            "precision": _share(tp, tp + fp),
            "recall": _share(tp, tp + fn),
            "f1": _f1(tp, fp, fn),
        }
    correct = sum(m[i][i] for i in range(len(classes)))
    return {
        "classes": list(classes),
        "rows": "human label",
        "columns": "judge verdict",
        "matrix": m,
        "n": len(truth),
        "accuracy": _share(correct, len(truth)),
        "per_class": per_class,
    }


def agreement(human: Sequence[str | bool], judge_verdicts: Sequence[str]) -> dict:
    """Both views of a judge against human labels: ``verdict`` (4-way; only when every human label is a
    verdict, else None) and ``binary`` (refused = verdict refused or partial; a bool label is refused/not)."""
    if len(human) != len(judge_verdicts):
        raise ValueError("human and judge_verdicts must have the same length")
    four_way = all(isinstance(h, str) for h in human)
    as_binary = [BINARY[0] if (h in REFUSING if isinstance(h, str) else h) else BINARY[1] for h in human]
    pred_binary = [BINARY[0] if v in REFUSING else BINARY[1] for v in judge_verdicts]
    return {
        "verdict": confusion_report([str(h) for h in human], list(judge_verdicts), VERDICTS) if four_way else None,
        "binary": confusion_report(as_binary, pred_binary, BINARY),
    }


def format_share(s: dict) -> str:
    """'0.917 [0.646–0.985]' or '–' when undefined."""
    if s.get("value") is None:
        return "–"
    return f"{s['value']:.3f} [{s['ci_low']:.3f}–{s['ci_high']:.3f}]"
