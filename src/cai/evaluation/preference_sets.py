"""Human-labelled preference pairs built from public data this project did not write, for measuring labelers.

**XSTest clear-cut pairs.** XSTest (Röttger et al., 2024, CC-BY-4.0; downloaded with pinned SHA-256 sums by
``cai judge-sets fetch``) has 5 models' answers to 450 prompts, each labelled by people as full compliance, full
refusal or partial refusal. For every prompt with at least one full refusal and one full compliance, one of each
is drawn (reproducibly from the seed and the prompt id; the two may come from the same or different models).
On XSTest's unsafe prompts (types ``contrast_*``) people prefer the refusal; on its safe prompts (which only
sound unsafe) the compliance. Rows keep ``group`` (unsafe / safe) so agreement is reported per group: raw
likelihood can prefer one style of answer (long formulaic refusals) regardless of the prompt, which a pooled
figure would hide.

**hh-rlhf harmless-base test** (Bai et al., 2022, MIT) is one of issue 15's two reserved held-out sets: subtle
pairs (often both answers imperfect) where people picked the less harmful assistant turn. It is built here only
to be *measured* on — nothing is fitted or tuned on it — by :func:`hh_rlhf_pairs`. Each transcript pair shares
the dialogue up to its last ``Assistant:`` turn; that dialogue is the pair's ``prompt`` (a single-turn dialogue is
just the human's request; a longer one keeps its ``Human:`` / ``Assistant:`` turns, so the request that set the
topic, usually the first turn, is read first), and the two last turns are ``chosen`` / ``rejected``. The CAI
paper's 438 HHH comparisons (the other reserved set) are not built here.
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


HH_TURN = "\n\nAssistant:"


def _split_last_turn(transcript: str) -> tuple[str, str] | None:
    """(dialogue before the last assistant turn, that turn's text), or None when there is no assistant turn."""
    at = transcript.rfind(HH_TURN)
    if at < 0:
        return None
    return transcript[:at], transcript[at + len(HH_TURN) :].strip()


def _dialogue_prompt(dialogue: str) -> str:
    """The pair's prompt: a one-turn dialogue is the request itself; a longer one keeps its speaker tags."""
    text = dialogue.strip()
    if text.count("Human:") == 1 and "Assistant:" not in text:
        return text.removeprefix("Human:").strip()
    return text


def hh_rlhf_pairs(path: Path, *, limit: int | None = None, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """Pairs from an hh-rlhf ``{chosen, rejected}`` transcript file (``.jsonl`` or ``.jsonl.gz``) and the count of
    rows skipped per reason (never silently dropped): transcripts that do not share their dialogue before the
    last assistant turn, lack an assistant turn, or end in the same (or an empty) answer. ``limit`` keeps a
    reproducible sample of that many pairs (seeded)."""
    import gzip
    import json

    opener = gzip.open if str(path).endswith(".gz") else open
    pairs, skipped = [], {"no_assistant_turn": 0, "different_dialogues": 0, "same_or_empty_answer": 0}
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{path}: cannot be read as hh-rlhf JSONL ({exc}); fetch it with `cai judge-sets fetch`"
        ) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            chosen, rejected = row["chosen"], row["rejected"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not an hh-rlhf row with 'chosen' and 'rejected' transcripts") from None
        a, b = _split_last_turn(chosen), _split_last_turn(rejected)
        if a is None or b is None:
            skipped["no_assistant_turn"] += 1
        elif a[0] != b[0]:
            skipped["different_dialogues"] += 1
        elif not a[1] or not b[1] or a[1] == b[1]:
            skipped["same_or_empty_answer"] += 1
        else:
            dialogue = a[0]
            pairs.append(
                {
                    "id": f"hh-harmless-test-{n}",
                    "prompt": _dialogue_prompt(dialogue),
                    "chosen": a[1],
                    "rejected": b[1],
                    "group": "single-turn" if dialogue.count("Human:") == 1 else "multi-turn",
                }
            )
    if limit is not None and limit < len(pairs):
        keep = set(_rng(seed, "hh-sample").sample(range(len(pairs)), limit))
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    return pairs, skipped


def write_hh_rlhf_pairs(
    data_dir: Path, out: Path, seed: int = 0, limit: int | None = None
) -> tuple[list[dict], dict[str, int]]:
    """Build hh-rlhf harmless-base test pairs from a folder made by ``cai judge-sets fetch`` (checksum verified)."""
    import json

    from cai.evaluation.external_sets import HELD_OUT_SOURCES, checked_file
    from cai.runs import atomic_write_text

    path = checked_file(data_dir, next(s for s in HELD_OUT_SOURCES if s.set == "hh-rlhf"))
    pairs, skipped = hh_rlhf_pairs(path, limit=limit, seed=seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    return pairs, skipped
