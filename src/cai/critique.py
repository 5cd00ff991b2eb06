"""Constitutional AI's SL phase (critique → revision): the policy answers each red-team prompt, then for R rounds
the feedback model critiques the current answer under a sampled principle and rewrites it. The ``critique`` stage
runs it over a run's prompts and writes the artifacts.

Every phase (initial answers, round r critiques, round r revisions) is one batched ``generate`` call over all items
(in flushed chunks), recorded in a steps JSONL so a kill resumes mid-round. The constitution's demonstrations are
the same few-shot chat turns, in the same order, at the start of every critique/revision chat, so servers with
prefix caching (vLLM, llama.cpp) compute that prefix once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cai.backends import Backend, SamplingParams
from cai.constitution import Constitution
from cai.data import Prompt
from cai.generation import chat_for
from cai.runs import JsonlWriter, StageDir

CHUNK = 64
_LABELS = ("revision:", "revised response:", "critique:", "assistant:")


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def clean(text: str) -> str:
    """Strip whitespace and a leading 'Revision:'-style label that small models echo."""
    out = text.strip()
    while out.lower().startswith(_LABELS):
        out = out.split(":", 1)[1].strip()
    return out


def demonstration_turns(constitution: Constitution, n: int | None) -> list[dict]:
    """The few-shot prefix: for each demonstration, prompt → answer → critique request → critique → revision
    request → revision, as chat turns."""
    turns: list[dict] = []
    for d in constitution.demonstrations[: n if n is not None else None]:
        p = constitution.principle(d.principle)
        turns += [
            {"role": "user", "content": d.prompt},
            {"role": "assistant", "content": d.response},
            {"role": "user", "content": p.critique},
            {"role": "assistant", "content": d.critique},
            {"role": "user", "content": p.revision},
            {"role": "assistant", "content": d.revision},
        ]
    return turns


# ---- which principle critiques which answer ---------------------------------------------------------------------
def principle_table(
    prompts: Sequence[Prompt], constitution: Constitution, probabilities: dict[str, dict[str, float]] | None = None
) -> dict[str, dict[str, float]]:
    """Per prompt id, the principles it probes with a weight: the classify probabilities when given, else 1 for
    every principle whose categories cover the prompt's category."""
    if probabilities is not None:
        return probabilities
    return {p.id: {q.name: 1.0 for q in constitution.principles_for_category(p.category)} for p in prompts}


def principle_weights(
    prompts: Sequence[Prompt], table: dict[str, dict[str, float]], allowed: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per prompt id, sampling weights over the ``allowed`` principles: its entries of ``table`` (see
    :func:`principle_table`), else uniform over all allowed principles."""
    out = {}
    for p in prompts:
        w = {n: v for n, v in table.get(p.id, {}).items() if n in allowed and v > 0}
        out[p.id] = w or {n: 1.0 for n in allowed}
    return out


def sample_principle(weights: dict[str, float], seed: int, item_id: str, rnd: int) -> str:
    """A principle drawn with the given weights; deterministic per (seed, item, round), so resumes agree."""
    rng = random.Random(f"{seed}:{item_id}:{rnd}")
    names = sorted(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


# ---- the rounds ----------------------------------------------------------------------------------------------------
class Phases:
    """Runs one batched generation phase at a time over all items, resuming from ``writer`` (one record per
    phase and item, id ``<phase>:<item>``); items whose chat is too long for the model are skipped in ``stage``."""

    def __init__(self, writer: JsonlWriter, stage: StageDir, sampling: SamplingParams, *, progress: bool = True):
        self.w, self.stage, self.sampling, self.progress = writer, stage, sampling, progress
        self.failed: set[str] = set()

    def run(
        self,
        backend: Backend,
        phase: str,
        chats: dict[str, list[dict]],
        max_new_tokens: int,
        offset: int,
        extra: dict[str, dict] | None = None,
    ) -> dict[str, dict]:
        from tqdm.auto import tqdm

        todo = [i for i in chats if f"{phase}:{i}" not in self.w]
        bar = tqdm(total=len(chats), initial=len(chats) - len(todo), desc=phase, unit="item", disable=not self.progress)
        for k in range(0, len(todo), CHUNK):
            part = todo[k : k + CHUNK]
            params = replace(self.sampling, max_new_tokens=max_new_tokens, seed=(self.sampling.seed or 0) + offset + k)
            for i, g in zip(part, backend.generate([chats[i] for i in part], params), strict=False):
                if g.finish_reason == "error":
                    self.failed.add(i)
                    self.stage.skip(i, f"{phase}: chat of {g.prompt_tokens} tokens is too long for the model")
                    continue
                self.w.write(
                    {
                        "id": f"{phase}:{i}",
                        "text": clean(g.text),
                        "finish_reason": g.finish_reason,
                        **(extra or {}).get(i, {}),
                    }
                )
            bar.update(len(part))
            self.stage.save()
        bar.close()
        by_id = {r["id"]: r for r in self.w.records}
        return {i: by_id[f"{phase}:{i}"] for i in chats if f"{phase}:{i}" in by_id}


@dataclass
class Revised:
    """What :func:`critique_and_revise` produced: one record per item that went through every round (the
    ``data.jsonl`` record: id, prompt, category, initial, rounds, final, changed, length_ratio, messages) and the
    policy's non-empty answers to the helpfulness prompts, by :func:`helpful_id`."""

    items: list[dict]
    helpful_answers: dict[str, str]


def helpful_id(prompt: Prompt) -> str:
    """Id of a helpfulness record (kept apart from red-team ids, even if a benign set reuses them)."""
    return f"helpful:{prompt.id}"


def critique_and_revise(
    policy: Backend,
    feedback: Backend,
    prompts: Sequence[Prompt],
    constitution: Constitution,
    weights: dict[str, dict[str, float]],
    steps: JsonlWriter,
    stage: StageDir,
    *,
    sampling: SamplingParams,
    rounds: int,
    few_shot: int | None,
    critique_max_new_tokens: int,
    revision_max_new_tokens: int,
    system_prompt: str | None = None,
    helpful: Sequence[Prompt] = (),
    progress: bool = True,
) -> Revised:
    """The policy's first answers (to ``prompts`` and to the ``helpful`` prompts, with ``system_prompt``), then
    ``rounds`` of critique (feedback model, under a principle drawn from ``weights`` per item and round) and
    revision of every red-team answer. Resumes from ``steps``; problems are recorded as skips in ``stage``."""
    seed = sampling.seed if sampling.seed is not None else 0
    phases = Phases(steps, stage, sampling, progress=progress)
    prefix = demonstration_turns(constitution, few_shot)
    asked = {p.id: chat_for(p.prompt, system_prompt) for p in prompts}
    asked.update({helpful_id(p): chat_for(p.prompt, system_prompt) for p in helpful})
    initial = phases.run(policy, "initial", asked, sampling.max_new_tokens, 0)
    current = {p.id: initial[p.id]["text"] for p in prompts if p.id in initial}
    history: dict[str, list[dict]] = {i: [] for i in current}
    by_id = {p.id: p for p in prompts}
    for r in range(1, rounds + 1):
        ids = [i for i in current if i not in phases.failed]
        chosen = {i: sample_principle(weights[i], seed, i, r) for i in ids}
        base = {
            i: prefix
            + [
                {"role": "user", "content": by_id[i].prompt},
                {"role": "assistant", "content": current[i]},
                {"role": "user", "content": constitution.principle(chosen[i]).critique},
            ]
            for i in ids
        }
        crit = phases.run(
            feedback,
            f"critique{r}",
            base,
            critique_max_new_tokens,
            10_000 * r,
            {i: {"principle": chosen[i]} for i in ids},
        )
        ids = [i for i in ids if i in crit]
        rev_chats = {
            i: base[i]
            + [
                {"role": "assistant", "content": crit[i]["text"]},
                {"role": "user", "content": constitution.principle(chosen[i]).revision},
            ]
            for i in ids
        }
        rev = phases.run(feedback, f"revision{r}", rev_chats, revision_max_new_tokens, 10_000 * r + 5_000)
        for i in [i for i in ids if i in rev]:
            text = rev[i]["text"] or current[i]  # an empty revision keeps what it revised
            history[i].append(
                {
                    "principle": chosen[i],
                    "critique": crit[i]["text"],
                    "revision": text,
                    "changed": normalize(text) != normalize(current[i]),
                    "empty": not rev[i]["text"],
                    "length_ratio": round(len(text) / max(1, len(current[i])), 3),
                }
            )
            current[i] = text
    answers = {
        helpful_id(p): initial[helpful_id(p)]["text"] for p in helpful if initial.get(helpful_id(p), {}).get("text")
    }
    for p in helpful:
        if helpful_id(p) in initial and helpful_id(p) not in answers:
            stage.skip(helpful_id(p), "helpfulness answer is empty; left out of sft.jsonl")
    items = [
        revision_record(by_id[i], initial[i]["text"], history[i])
        for i in history
        if len(history[i]) == rounds and i not in phases.failed
    ]
    return Revised(items, answers)


def revision_record(prompt: Prompt, initial: str, rounds: list[dict]) -> dict:
    """One item's record: its first answer, every round, the final answer and the SFT chat it becomes."""
    final = rounds[-1]["revision"] if rounds else initial
    return {
        "id": prompt.id,
        "prompt": prompt.prompt,
        "category": prompt.category,
        "initial": initial,
        "rounds": rounds,
        "final": final,
        "changed": normalize(final) != normalize(initial),
        "length_ratio": round(len(final) / max(1, len(initial)), 3),
        "messages": [{"role": "user", "content": prompt.prompt}, {"role": "assistant", "content": final}],
    }


def sft_records(
    items: list[dict], helpful: Sequence[Prompt], answers: dict[str, str], *, keep_unchanged: bool = True
) -> list[dict]:
    """The SL-CAI training set: the revisions (also the unchanged ones when ``keep_unchanged``) plus the policy's
    answers to the helpfulness prompts."""
    out = [
        {"id": it["id"], "messages": it["messages"], "source": "revision"}
        for it in items
        if keep_unchanged or it["changed"]
    ]
    out += [
        {
            "id": helpful_id(p),
            "source": "helpful",
            "messages": [
                {"role": "user", "content": p.prompt},
                {"role": "assistant", "content": answers[helpful_id(p)]},
            ],
        }
        for p in helpful
        if helpful_id(p) in answers
    ]
    return out


def summarize(items: list[dict], rounds: int, n_helpful: int, seconds: float) -> dict[str, Any]:
    """How much the revisions changed: unchanged rates (overall and per round), empty revisions, length ratio."""
    n = max(1, len(items))
    by_round = [round(sum(1 for it in items if not it["rounds"][r]["changed"]) / n, 3) for r in range(rounds)]
    return {
        "items": len(items),
        "rounds": rounds,
        "unchanged_rate": round(sum(1 for it in items if not it["changed"]) / n, 3),
        "unchanged_rate_by_round": by_round,
        "empty_revisions": sum(1 for it in items for r in it["rounds"] if r["empty"]),
        "mean_length_ratio": round(sum(it["length_ratio"] for it in items) / n, 3),
        "helpful_records": n_helpful,
        "items_per_min": round(len(items) / seconds * 60, 2) if seconds > 0 else None,
    }


def before_after(items: list[dict], n: int) -> list[dict]:
    """The first ``n`` items as before/after samples (prompt, last principle and critique, first and final answer)."""
    return [
        {
            "prompt": it["prompt"],
            "principle": it["rounds"][-1]["principle"],
            "initial": it["initial"],
            "critique": it["rounds"][-1]["critique"],
            "final": it["final"],
        }
        for it in items[:n]
    ]
