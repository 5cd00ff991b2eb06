"""Stage ``critique``: the policy answers each red-team prompt, then for R rounds the feedback model critiques the
current answer under a sampled principle and rewrites it (Constitutional AI's SL phase).

Every phase (initial answers, round r critiques, round r revisions) is one batched ``generate`` call over all items
(in flushed chunks), recorded in ``steps.jsonl`` so a kill resumes mid-round. The constitution's demonstrations are
the same few-shot chat turns, in the same order, at the start of every critique/revision chat, so servers with
prefix caching (vLLM, llama.cpp) compute that prefix once.

Outputs: ``data.jsonl`` (id, prompt, initial, rounds, final, changed, messages), ``data.csv`` and ``sft.jsonl``
(the revisions plus helpfulness records: policy answers to benign prompts).
"""

from __future__ import annotations

import csv
import random
from typing import Any

from pydantic import Field

from cai.settings import Strict
from cai.errors import UserError
from cai.generation import chat_for
from cai.runs import JsonlWriter, read_jsonl
from cai.stages.classify import load_run_constitution
from cai.stages.prompts import read_prompts

CHUNK = 64
_LABELS = ("revision:", "revised response:", "critique:", "assistant:")


class CritiqueConfig(Strict):
    """Config section ``critique``."""

    rounds: int = Field(1, ge=1, le=4, description="critique→revision rounds per item")
    few_shot: int | None = Field(None, ge=0, description="demonstrations shown (null: all of the constitution's)")
    critique_max_new_tokens: int = Field(64, ge=1)
    revision_max_new_tokens: int | None = Field(None, ge=1, description="null: generation.max_new_tokens")
    principles: list[str] | None = Field(None, description="sample only these principles (null: all)")
    helpful_ratio: float = Field(0.25, ge=0, description="helpfulness (benign) SFT records per revision record")
    keep_unchanged: bool = Field(True, description="train on revisions identical to what they revised")
    system_prompt: bool = Field(False, description="give the policy the constitution's system prompt for its first answer")
    show_samples: int = Field(3, ge=0, description="before/after samples printed and kept in the manifest")


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def clean(text: str) -> str:
    """Strip whitespace and a leading 'Revision:'-style label that small models echo."""
    out = text.strip()
    while out.lower().startswith(_LABELS):
        out = out.split(":", 1)[1].strip()
    return out


def demonstration_turns(constitution, n: int | None) -> list[dict]:
    """The few-shot prefix: for each demonstration, prompt → answer → critique request → critique → revision
    request → revision, as chat turns."""
    turns: list[dict] = []
    for d in constitution.demonstrations[: n if n is not None else None]:
        p = constitution.principle(d.principle)
        turns += [{"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.response},
                  {"role": "user", "content": p.critique}, {"role": "assistant", "content": d.critique},
                  {"role": "user", "content": p.revision}, {"role": "assistant", "content": d.revision}]
    return turns


def sample_principle(weights: dict[str, float], seed: int, item_id: str, rnd: int) -> str:
    """A principle drawn with the given weights; deterministic per (seed, item, round), so resumes agree."""
    rng = random.Random(f"{seed}:{item_id}:{rnd}")
    names = sorted(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def principle_weights(ctx, constitution, prompts) -> tuple[dict[str, dict[str, float]], str]:
    """Per prompt id, sampling weights over principles: the classify stage's probabilities when it ran, else
    uniform over the principles whose categories cover the prompt's category (else over all)."""
    allowed = ctx.config.critique.principles or [p.name for p in constitution.principles]
    known = {p.name for p in constitution.principles}
    for name in allowed:
        if name not in known:
            raise UserError(f"config field critique.principles: unknown principle {name!r} in constitution "
                            f"{constitution.name!r} (known: {', '.join(sorted(known))})")
    if ctx.run.stage("classify").complete:
        source = "classify"
        table = {r["id"]: {q["name"]: q["p"] for q in r["principles"]}
                 for r in read_jsonl(ctx.run.artifact("classify"))}
    else:
        source = "prompt categories"
        table = {p.id: {q.name: 1.0 for q in constitution.principles_for_category(p.category)} for p in prompts}
    out = {}
    for p in prompts:
        w = {n: v for n, v in table.get(p.id, {}).items() if n in allowed and v > 0}
        out[p.id] = w or {n: 1.0 for n in allowed}
    if ctx.config.critique.principles:
        for name in allowed:
            if not any(name in table.get(p.id, {}) for p in prompts):
                raise UserError(f"config field critique.principles: no prompt in {ctx.config.prompts.source!r} "
                                f"probes principle {name!r} (by {source}); add prompts for it or drop it")
    return out, source


class _Phases:
    """Runs one batched generation phase at a time, resuming from ``steps.jsonl``."""

    def __init__(self, ctx, writer: JsonlWriter):
        self.ctx, self.w = ctx, writer
        self.failed: set[str] = set()

    def run(self, phase: str, chats: dict[str, list[dict]], max_new_tokens: int, offset: int,
            extra: dict[str, dict] | None = None) -> dict[str, dict]:
        from tqdm.auto import tqdm

        from cai.backends import SamplingParams

        ctx = self.ctx
        backend = ctx.pool.policy() if phase == "initial" else ctx.pool.feedback()
        sampling = ctx.config.generation.sampling(ctx.config.seed)
        todo = [i for i in chats if f"{phase}:{i}" not in self.w]
        bar = tqdm(total=len(chats), initial=len(chats) - len(todo), desc=phase, unit="item", disable=not ctx.progress)
        for k in range(0, len(todo), CHUNK):
            part = todo[k : k + CHUNK]
            params = SamplingParams(**{**sampling.__dict__, "max_new_tokens": max_new_tokens,
                                       "seed": ctx.config.seed + offset + k})
            for i, g in zip(part, backend.generate([chats[i] for i in part], params)):
                if g.finish_reason == "error":
                    self.failed.add(i)
                    ctx.stage.skip(i, f"{phase}: chat of {g.prompt_tokens} tokens is too long for the model")
                    continue
                self.w.write({"id": f"{phase}:{i}", "text": clean(g.text), "finish_reason": g.finish_reason,
                              **(extra or {}).get(i, {})})
            bar.update(len(part))
            ctx.stage.save()
        bar.close()
        by_id = {r["id"]: r for r in self.w.records}
        return {i: by_id[f"{phase}:{i}"] for i in chats if f"{phase}:{i}" in by_id}


def run(ctx) -> dict[str, Any]:
    import time

    cfg, section = ctx.config, ctx.config.critique
    t0 = time.time()
    constitution = load_run_constitution(cfg)
    prompts = read_prompts(ctx.run, "prompts")
    weights, source = principle_weights(ctx, constitution, prompts)
    helpful = _helpful_prompts(ctx, len(prompts))
    system = constitution.system_prompt if section.system_prompt else None
    prefix = demonstration_turns(constitution, section.few_shot)
    revision_tokens = section.revision_max_new_tokens or cfg.generation.max_new_tokens

    with ctx.stage.writer("steps.jsonl") as steps:
        phases = _Phases(ctx, steps)
        asked = {p.id: chat_for(p.prompt, system) for p in prompts}
        asked.update({_hid(p): chat_for(p.prompt, system) for p in helpful})
        initial = phases.run("initial", asked, cfg.generation.max_new_tokens, 0)
        current = {p.id: initial[p.id]["text"] for p in prompts if p.id in initial}
        history: dict[str, list[dict]] = {i: [] for i in current}
        by_id = {p.id: p for p in prompts}
        for r in range(1, section.rounds + 1):
            ids = [i for i in current if i not in phases.failed]
            chosen = {i: sample_principle(weights[i], cfg.seed, i, r) for i in ids}
            base = {i: prefix + [{"role": "user", "content": by_id[i].prompt},
                                 {"role": "assistant", "content": current[i]},
                                 {"role": "user", "content": constitution.principle(chosen[i]).critique}]
                    for i in ids}
            crit = phases.run(f"critique{r}", base, section.critique_max_new_tokens, 10_000 * r,
                              {i: {"principle": chosen[i]} for i in ids})
            ids = [i for i in ids if i in crit]
            rev_chats = {i: base[i] + [{"role": "assistant", "content": crit[i]["text"]},
                                       {"role": "user", "content": constitution.principle(chosen[i]).revision}]
                         for i in ids}
            rev = phases.run(f"revision{r}", rev_chats, revision_tokens, 10_000 * r + 5_000)
            for i in [i for i in ids if i in rev]:
                text = rev[i]["text"] or current[i]  # an empty revision keeps what it revised
                history[i].append({"principle": chosen[i], "critique": crit[i]["text"], "revision": text,
                                   "changed": normalize(text) != normalize(current[i]), "empty": not rev[i]["text"],
                                   "length_ratio": round(len(text) / max(1, len(current[i])), 3)})
                current[i] = text
        helpful_answers = {_hid(p): initial[_hid(p)]["text"] for p in helpful if initial.get(_hid(p), {}).get("text")}
        for p in helpful:
            if _hid(p) in initial and _hid(p) not in helpful_answers:
                ctx.stage.skip(_hid(p), "helpfulness answer is empty; left out of sft.jsonl")

    items = [_item(by_id[i], initial[i]["text"], history[i]) for i in history
             if len(history[i]) == section.rounds and i not in phases.failed]
    _write_outputs(ctx, items, helpful, helpful_answers)
    counts = _summary(items, section, len(helpful_answers), time.time() - t0)
    counts["principles_from"] = source
    counts["sft_records"] = len(read_jsonl(ctx.stage.file("sft.jsonl")))
    samples = [{"prompt": it["prompt"], "principle": it["rounds"][-1]["principle"], "initial": it["initial"],
                "critique": it["rounds"][-1]["critique"], "final": it["final"]} for it in items[: section.show_samples]]
    ctx.stage.finish(counts, samples=samples, feedback_model=cfg.models.feedback_spec)
    if ctx.progress:
        _print_samples(counts, samples)
    return {k: v for k, v in counts.items() if not isinstance(v, (dict, list))}


def _helpful_prompts(ctx, n_redteam: int) -> list:
    """The benign prompts whose policy answers are mixed into SFT (``helpful_ratio`` per revision)."""
    n = round(ctx.config.critique.helpful_ratio * n_redteam)
    if n == 0:
        return []
    if not ctx.config.benign:
        raise UserError("config field critique.helpful_ratio > 0 needs a 'benign' prompt set; add one or set it to 0")
    benign = read_prompts(ctx.run, "benign")
    random.Random(ctx.config.seed).shuffle(benign)
    if len(benign) < n:
        ctx.stage.skip("helpful", f"only {len(benign)} benign prompts for {n} helpfulness records")
    return benign[:n]


def _hid(prompt) -> str:
    """Id of a helpfulness record (kept apart from red-team ids, even if a benign set reuses them)."""
    return f"helpful:{prompt.id}"


def _item(prompt, initial: str, rounds: list[dict]) -> dict:
    final = rounds[-1]["revision"] if rounds else initial
    return {"id": prompt.id, "prompt": prompt.prompt, "category": prompt.category, "initial": initial,
            "rounds": rounds, "final": final, "changed": normalize(final) != normalize(initial),
            "length_ratio": round(len(final) / max(1, len(initial)), 3),
            "messages": [{"role": "user", "content": prompt.prompt}, {"role": "assistant", "content": final}]}


def _write_outputs(ctx, items: list[dict], helpful: list, answers: dict[str, str]) -> None:
    """data.jsonl, data.csv and sft.jsonl (revisions + helpfulness records)."""
    keep = ctx.config.critique.keep_unchanged
    with ctx.stage.writer("data.jsonl") as w:
        for it in items:
            w.write(it)
    with ctx.stage.writer("sft.jsonl") as w:
        for it in items:
            if keep or it["changed"]:
                w.write({"id": it["id"], "messages": it["messages"], "source": "revision"})
        for p in helpful:
            if _hid(p) in answers:
                w.write({"id": _hid(p), "source": "helpful", "messages": [
                    {"role": "user", "content": p.prompt}, {"role": "assistant", "content": answers[_hid(p)]}]})
    cols = ["id", "category", "prompt", "principles", "initial", "critique", "final", "changed", "length_ratio"]
    tmp = ctx.stage.file(".data.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, cols)
        out.writeheader()
        for it in items:
            out.writerow({**{k: it[k] for k in cols if k in it},
                          "principles": ";".join(r["principle"] for r in it["rounds"]),
                          "critique": it["rounds"][-1]["critique"] if it["rounds"] else ""})
    tmp.replace(ctx.stage.file("data.csv"))


def _summary(items: list[dict], section: CritiqueConfig, n_helpful: int, seconds: float) -> dict[str, Any]:
    n = max(1, len(items))
    by_round = [round(sum(1 for it in items if not it["rounds"][r]["changed"]) / n, 3) for r in range(section.rounds)]
    return {
        "items": len(items),
        "rounds": section.rounds,
        "unchanged_rate": round(sum(1 for it in items if not it["changed"]) / n, 3),
        "unchanged_rate_by_round": by_round,
        "empty_revisions": sum(1 for it in items for r in it["rounds"] if r["empty"]),
        "mean_length_ratio": round(sum(it["length_ratio"] for it in items) / n, 3),
        "helpful_records": n_helpful,
        "items_per_min": round(len(items) / seconds * 60, 2) if seconds > 0 else None,
    }


def _print_samples(counts: dict, samples: list[dict]) -> None:
    from rich.console import Console

    con = Console(stderr=True)
    con.print(f"[bold]critique/revision[/bold]: {counts['items']} items, unchanged rate {counts['unchanged_rate']:.0%}, "
              f"mean length ratio {counts['mean_length_ratio']}")
    for s in samples:
        con.print(f"[cyan]prompt[/cyan] ({s['principle']}): {s['prompt'][:160]}\n"
                  f"  [red]before[/red]: {s['initial'][:240]!r}\n  [green]after[/green]:  {s['final'][:240]!r}",
                  highlight=False)
