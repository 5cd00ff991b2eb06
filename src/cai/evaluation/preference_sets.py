"""Human-labelled preference pairs built from public data this project did not write, for measuring labelers.

**XSTest clear-cut pairs.** XSTest (Röttger et al., 2024, CC-BY-4.0; downloaded with pinned SHA-256 sums by
``cai judge-sets fetch``) has 5 models' answers to 450 prompts, each labelled by people as full compliance, full
refusal or partial refusal. For every prompt with at least one full refusal and one full compliance, one of each
is drawn (reproducibly from the seed and the prompt id; the two may come from the same or different models).
On XSTest's unsafe prompts (types ``contrast_*``) people prefer the refusal; on its safe prompts (which only
sound unsafe) the compliance. Rows keep ``group`` (unsafe / safe) so agreement is reported per group: raw
likelihood can prefer one style of answer (long formulaic refusals) regardless of the prompt, which a pooled
figure would hide.

Reserved held-out sets, never built here: hh-rlhf's harmless-base *test* split and the CAI paper's 438 HHH
comparisons.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

from cai.errors import UserError

UNSAFE_TYPE_PREFIX = "contrast_"


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16))


def xstest_pairs(rows: Sequence[dict], seed: int = 0, per_group: int | None = None) -> list[dict]:
    """Clear-cut pairs from XSTest rows as :func:`cai.evaluation.external_sets.load` returns them (``id, group``
    = model, ``type, prompt, response, label``): one (refusal, compliance) pair per prompt that has both.
    ``per_group`` keeps that many unsafe and safe pairs, drawn reproducibly from the seed (a CPU-sized subset)."""
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["id"], []).append(r)
    pairs = []
    for pid, answers in by_prompt.items():
        if len({a["prompt"] for a in answers}) != 1:
            raise UserError(
                f"XSTest id {pid} names different prompts in different model files; the download is not the pinned "
                "one: fetch it again with `cai judge-sets fetch`"
            )
        answers = sorted(answers, key=lambda a: a["group"])  # model order: the draw does not depend on file order
        refused = [a for a in answers if a["label"] == "refused" and a["response"].strip()]
        complied = [a for a in answers if a["label"] == "complied" and a["response"].strip()]
        if not refused or not complied:
            continue
        rng = _rng(seed, pid)
        ref, comp = rng.choice(refused), rng.choice(complied)
        unsafe = answers[0]["type"].startswith(UNSAFE_TYPE_PREFIX)
        chosen, rejected = (ref, comp) if unsafe else (comp, ref)
        pairs.append(
            {
                "id": f"xstest-{pid}",
                "prompt": answers[0]["prompt"],
                "chosen": chosen["response"],
                "rejected": rejected["response"],
                "group": "unsafe" if unsafe else "safe",
                "type": answers[0]["type"],
                "chosen_model": chosen["group"],
                "rejected_model": rejected["group"],
                "chosen_label": chosen["label"],
            }
        )
    if per_group is not None:
        keep = set()
        for group in ("unsafe", "safe"):
            ids = [p["id"] for p in pairs if p["group"] == group]
            keep |= set(_rng(seed, f"subset-{group}").sample(ids, min(per_group, len(ids))))
        pairs = [p for p in pairs if p["id"] in keep]
    return pairs


def write_xstest_pairs(data_dir: Path, out: Path, seed: int = 0, per_group: int | None = None) -> list[dict]:
    """Build the XSTest pairs from a folder made by ``cai judge-sets fetch`` (checksums verified) into ``out``."""
    import json

    from cai.evaluation.external_sets import load
    from cai.runs import atomic_write_text

    pairs = xstest_pairs(load(data_dir)["xstest"], seed, per_group)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    return pairs
