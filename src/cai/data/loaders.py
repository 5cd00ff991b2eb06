"""Prompt loaders: bundled sets, JSONL / JSON / CSV / TXT files and Hugging Face datasets.

Every loader returns a :class:`PromptSet`. Per-item problems (a malformed line, an empty
prompt, a duplicate id) are recorded in ``PromptSet.skipped``; problems with the input as
a whole raise :class:`cai.errors.UserError` with a one-line message naming the fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from dataclasses import field as dc_field
from importlib import resources
from pathlib import Path
from typing import Any

from cai.errors import UserError

BUNDLED = ("redteam", "benign")
PROMPT_FIELDS = ("prompt", "text", "question", "instruction", "goal", "Behavior")
EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".txt")

# (1-based line or item number, record); a record is a str or a dict
Records = list[tuple[int, Any]]


@dataclass
class Prompt:
    """One prompt with a stable id."""

    id: str
    prompt: str
    category: str = "unknown"
    split: str = "train"
    source: str = ""

    def to_dict(self) -> dict:
        """The prompts-artifact row: ``id, prompt, category, split, source``."""
        return asdict(self)


@dataclass
class PromptSet:
    """Loaded prompts, where they came from, and what was skipped and why."""

    prompts: list[Prompt]
    source: str
    skipped: list[dict] = dc_field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def filter(self, split: str | None = None, categories: list[str] | None = None) -> PromptSet:
        """Keep prompts of ``split`` (if given) whose category is in ``categories`` (if given)."""
        cats = set(categories) if categories is not None else None
        kept = [p for p in self.prompts if (split is None or p.split == split) and (cats is None or p.category in cats)]
        return replace(self, prompts=kept, skipped=list(self.skipped))


def bundled_path(name: str) -> Path:
    """Path of a packaged prompt set: ``"redteam"`` or ``"benign"``."""
    name = name.removeprefix("bundled:")
    if name not in BUNDLED:
        raise UserError(f"unknown bundled prompt set '{name}'; choose one of: {', '.join(BUNDLED)}")
    return Path(str(resources.files("cai.data").joinpath(f"{name}.jsonl")))


def stable_id(text: str) -> str:
    """``p-`` + the first 12 hex digits of the SHA-1 of the prompt text."""
    return "p-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def load_prompts(
    source: str | Path,
    field: str | None = None,
    *,
    split: str | None = None,
    id_field: str = "id",
    category_field: str = "category",
    limit: int | None = None,
) -> PromptSet:
    """Load prompts from a bundled name, a local file, or ``hf:<dataset>[:<config>][@<split>]``.

    ``field`` names the prompt text field (default: the first of :data:`PROMPT_FIELDS` present).
    ``split`` keeps records whose ``split`` is that value; when no record has a split, all are
    kept and labelled with it (when some do, records without one count as ``"train"``).
    ``limit`` keeps the first N prompts after filtering.
    """
    skipped: list[dict] = []
    src = str(source)
    if isinstance(source, str) and source.startswith("hf:"):
        label, records = src, _read_hf(src)
    else:
        path = bundled_path(src) if src in BUNDLED or src.startswith("bundled:") else Path(src)
        label = src
        records = _read_file(path, skipped)

    text_field = _pick_field(records, field, label)
    # records without a split are "train" when others have one, else take the requested split
    has_split = any(isinstance(r, dict) and r.get("split") for _, r in records)
    default_split = "train" if has_split else (split or "train")
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    for line, rec in records:
        if isinstance(rec, str):
            text, row = rec, {}
        elif isinstance(rec, dict):
            row = rec
            if text_field not in row or row[text_field] is None:
                skipped.append({"line": line, "reason": f"missing field '{text_field}'"})
                continue
            text = row[text_field]
            if not isinstance(text, str):
                skipped.append({"line": line, "reason": f"field '{text_field}' is not text"})
                continue
        else:
            skipped.append({"line": line, "reason": f"not a string or object ({type(rec).__name__})"})
            continue
        text = text.strip()
        if not text:
            skipped.append({"line": line, "reason": "empty prompt"})
            continue
        raw_id = row.get(id_field)
        pid = str(raw_id).strip() if raw_id not in (None, "") else stable_id(text)
        if pid in first_line:
            skipped.append({"line": line, "reason": f"duplicate id '{pid}' (first on line {first_line[pid]})"})
            continue
        first_line[pid] = line
        prompts.append(
            Prompt(
                id=pid,
                prompt=text,
                category=str(row.get(category_field) or "unknown"),
                split=str(row.get("split") or default_split),
                source=str(row.get("source") or label),
            )
        )

    if not prompts:
        why = f" ({len(skipped)} skipped, first: line {skipped[0]['line']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"{label} contains no prompts{why}; add at least one non-empty prompt")
    if split is not None:
        kept = [p for p in prompts if p.split == split]
        if not kept:
            present = ", ".join(sorted({p.split for p in prompts}))
            raise UserError(f"{label} has no prompts with split '{split}'; splits present: {present}")
        prompts = kept
    if limit is not None:
        prompts = prompts[: max(limit, 0)]
    return PromptSet(prompts=prompts, source=label, skipped=skipped)


def _read_file(path: Path, skipped: list[dict]) -> Records:
    """Parse a local file into numbered records; per-line JSONL problems go to ``skipped``."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise UserError(
            f"prompt file '{path}' {what}; pass a .jsonl/.json/.csv/.txt file, "
            f"hf:<dataset>, or a bundled set ({', '.join(BUNDLED)})"
        )
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise UserError(f"{path} has unsupported extension '{ext}'; use one of {', '.join(EXTENSIONS)}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None

    records: Records = []
    if ext in (".jsonl", ".ndjson"):
        for n, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                skipped.append({"line": n, "reason": f"malformed JSON: {e.msg}"})
    elif ext == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); fix the file") from None
        if not isinstance(data, list):
            raise UserError(f"{path} must hold a JSON list of strings or objects, not {type(data).__name__}")
        records = list(enumerate(data, 1))
    elif ext == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            for row in reader:
                records.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
        except csv.Error as e:
            raise UserError(f"{path} is not valid CSV ({e}); fix the file") from None
    else:  # .txt
        records = [(n, line) for n, line in enumerate(_lines(text), 1) if line.strip()]
    return records


def _lines(text: str) -> list[str]:
    """Lines ended by \\n, \\r\\n or \\r only. Not ``str.splitlines``: it also splits on U+2028, U+2029, U+0085,
    \\v, \\f and other separators, which are legal inside a JSON string or a prompt (records would be cut in
    two, dropped as malformed, and every later line number would be wrong)."""
    if not text:
        return []
    end = next((e for e in ("\r\n", "\n", "\r") if text.endswith(e)), "")
    return _NEWLINE.split(text[: len(text) - len(end)])


_NEWLINE = re.compile(r"\r\n|\r|\n")


def _read_hf(spec: str) -> Records:
    """Load ``hf:<dataset>[:<config>][@<split>]`` with ``datasets.load_dataset``."""
    body = spec.removeprefix("hf:")
    body, _, hf_split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise UserError(f"'{spec}' names no dataset; use hf:<dataset>[:<config>][@<split>]")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=hf_split or "train")
    except Exception as e:  # the datasets library raises many types; all are user-facing here
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        if _is_offline(e):
            raise UserError(
                f"could not load {spec}: the Hugging Face Hub is unreachable (offline?); "
                "pass a local .jsonl/.json/.csv/.txt file instead"
            ) from None
        raise UserError(f"could not load {spec} ({msg}); check the dataset name, config and split") from None
    return [(i, dict(row)) for i, row in enumerate(ds, 1)]


def _is_offline(exc: BaseException) -> bool:
    """Whether an exception from ``datasets`` means the Hub could not be reached."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("couldn't reach", "connect", "offline", "name or service", "timed out"))


def _pick_field(records: Records, field: str | None, label: str) -> str:
    """The prompt text field: ``field`` if some record has it, else the first default present."""
    dicts = [r for _, r in records if isinstance(r, dict)]
    if not dicts:
        return field or PROMPT_FIELDS[0]
    present: dict[str, None] = {}
    for r in dicts:
        present.update(dict.fromkeys(r))
    names = ", ".join(present) or "(none)"
    if field is not None:
        if field not in present:
            raise UserError(f"{label} has no field '{field}'; fields present: {names}. Pass --field NAME.")
        return field
    for candidate in PROMPT_FIELDS:
        if candidate in present:
            return candidate
    raise UserError(
        f"{label} has no prompt field (tried {', '.join(PROMPT_FIELDS)}); fields present: {names}. "
        "Pass --field NAME."
    )
