"""Data an experiment builds at run time: a model's answers (loaded, used, freed), constitution-style refusals,
and SFT records (built, written, or read from a user's file)."""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Sequence
from pathlib import Path

from cai.backends import SamplingParams
from cai.data import Prompt
from cai.errors import UserError
from cai.runs import StageDir, read_jsonl


def release(backend) -> None:
    """Free a loaded model before training or loading the next one."""
    backend.close()
    gc.collect()


def answer(
    spec: str,
    prompts: Sequence[Prompt],
    stage: StageDir,
    file: str,
    sampling: SamplingParams,
    *,
    batch_size: int,
    progress: bool,
    prefix: str = "",
    extra: dict | None = None,
) -> dict[str, dict]:
    """Greedy (or sampled) answers of model ``spec`` to ``prompts`` (each prefixed by ``prefix``), appended to
    ``stage/file`` resumably; returns records by id. Prompts too long for the model are recorded as skipped."""
    from cai.backends import get_backend
    from cai.generation import generate_responses

    asked = [Prompt(p.id, prefix + p.prompt, p.category, p.split, p.source) for p in prompts]
    with stage.writer(file) as w:
        if any(p.id not in w for p in asked):
            backend = get_backend(spec, batch_size=batch_size)
            try:
                generate_responses(
                    backend, asked, w, sampling, stage=stage, chunk=max(batch_size, 8), progress=progress, extra=extra
                )
            finally:
                release(backend)
        return {r["id"]: r for r in w.records}


_REFUSALS = (
    "I can't help with {topic}; that's outside what I can do, and it isn't a judgement of you. "
    "If it's useful, I can point you to a safer place to start.",
    "That's not something I can help with: {topic} is beyond what I do. "
    "I'm happy to help with a related question, or to suggest someone who can.",
    "I'm not able to help with {topic}. That's a limit on my side, not a comment on you. "
    "Is there a nearby question I could help with instead?",
)


def refusal_for(prompt: Prompt, constitution) -> str:
    """One of three fixed refusals (chosen by a hash of the prompt id), naming the topic of the constitution's
    principle that covers the prompt's category. The texts are written to the bundled constitutions'
    ``refusal_style`` (a limit of the assistant, no moralising, an alternative offered); ``refusal_style`` itself
    is an instruction to a model, not a template, so it is not read here — experiments train on the same
    refusal wording whatever the constitution."""
    topic = next(
        (p.label for p in constitution.principles if prompt.category in p.categories), constitution.principles[0].label
    )
    k = int(hashlib.sha1(prompt.id.encode()).hexdigest(), 16) % len(_REFUSALS)
    return _REFUSALS[k].format(topic=topic)


def sft_record(rid: str, prompt: str, response: str) -> dict:
    """One record in train_sft's format."""
    return {"id": rid, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def safety_records(harmful: Sequence[Prompt], benign_answers: dict[str, dict], constitution) -> list[dict]:
    """SL-CAI-style safe SFT data: constitution-style refusals for harmful prompts plus the policy's own helpful
    answers to benign prompts (so helpfulness is kept)."""
    records = [sft_record(f"refuse-{p.id}", p.prompt, refusal_for(p, constitution)) for p in harmful]
    records += [
        sft_record(f"help-{rid}", r["prompt"], r["response"])
        for rid, r in benign_answers.items()
        if r["response"].strip()
    ]
    return records


def write_records(stage: StageDir, file: str, records: list[dict]) -> Path:
    with stage.writer(file) as w:
        for r in records:
            w.write(r)
    return stage.file(file)


def load_records(path: str | Path, what: str) -> list[dict]:
    """User-given SFT records: ``{"id", "messages"}`` or ``{"prompt", "response"}`` per line; a file without any
    usable record is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: {p} not found; pass a JSONL file of {{id, messages}} or {{prompt, response}} lines")
    records = []
    for i, r in enumerate(read_jsonl(p)):
        rid = str(r.get("id") or f"{p.stem}-{i}")
        if isinstance(r.get("messages"), list) and r["messages"]:
            records.append({"id": rid, "messages": r["messages"]})
        elif isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
            records.append(sft_record(rid, r["prompt"], r["response"]))
    if not records:
        raise UserError(f"{what}: {p} has no records with 'messages' or 'prompt' and 'response'")
    return records
