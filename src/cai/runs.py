"""Run directories, manifests and append-only JSONL artifacts that survive kills.

Layout: ``runs/<name>/<stage>/`` holds the stage's JSONL artifacts and ``manifest.json``. Items are appended
one line each and flushed; on resume a torn last line (a process killed mid-write) is cut off and ids already
present are skipped, so no item is duplicated or lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai.errors import UserError


def config_hash(config: Any) -> str:
    """Stable short hash of a JSON-serialisable config."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [f"{path or '<config>'}: {old!r} -> {new!r}"]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("cai-lab", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a kill leaves either the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict]:
    """Read a JSONL artifact. A last line without its newline is a torn write: ignored, and cut off the file
    when ``repair`` is set. A malformed line elsewhere is corruption and raises UserError."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: corrupt JSONL line; delete the file or rerun the stage with --force") from None
    return records


class JsonlWriter:
    """Append-only JSONL file keyed by ``id``: resumes where a killed process stopped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_jsonl(self.path, repair=True)
        self.done: set[str] = {str(r.get("id")) for r in self.records}
        self._f = open(self.path, "a", encoding="utf-8")

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self.done

    def write(self, record: dict) -> None:
        rid = str(record.get("id"))
        if rid in self.done:
            return
        self._f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._f.flush()
        self.done.add(rid)
        self.records.append(record)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StageDir:
    """One stage's folder in a run, with its manifest."""

    path: Path
    stage: str
    manifest: dict[str, Any] = field(default_factory=dict)
    _t0: float = field(default_factory=time.time)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    def begin(self, config: dict[str, Any], *, force: bool = False, run_name: str = "") -> None:
        """Start or resume the stage. A different config under an existing stage is refused unless ``force``
        (which recomputes the stage from scratch, after moving the old folder aside)."""
        self.path.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None
        new_hash = config_hash(config)
        if old and old.get("config_hash") != new_hash:
            if not force:
                changes = _diff(old.get("config", {}), config)
                shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
                raise UserError(
                    f"stage '{self.stage}' of run '{run_name or self.path.parent.name}' was made with a different "
                    f"config ({shown}); pass --force to recompute it or --name NEW for a new run"
                )
            backup = self.path.with_name(f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, backup)
            self.path.mkdir(parents=True)
            old = None
        self.manifest = old or {
            "stage": self.stage,
            "config": config,
            "config_hash": new_hash,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "counts": {},
            "skipped": [],
            "timings": {},
        }
        self.manifest.update(status="running", versions=package_versions(), git_commit=git_commit())
        self.manifest.setdefault("attempts", 0)
        self.manifest["attempts"] += 1
        self._t0 = time.time()
        self.save()

    def skip(self, item_id: Any, reason: str) -> None:
        """Record a per-item problem (never silently dropped)."""
        entry = {"id": str(item_id), "reason": reason}
        if entry not in self.manifest["skipped"]:
            self.manifest["skipped"].append(entry)

    def finish(self, counts: dict[str, Any] | None = None, **extra: Any) -> None:
        self.manifest["counts"].update(counts or {})
        self.manifest["timings"]["last_attempt_s"] = round(time.time() - self._t0, 2)
        self.manifest["timings"]["total_s"] = round(self.manifest["timings"].get("total_s", 0) + time.time() - self._t0, 2)
        self.manifest.update(extra, status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()

    def save(self) -> None:
        write_json(self.manifest_path, self.manifest)

    def writer(self, name: str = "data.jsonl") -> JsonlWriter:
        return JsonlWriter(self.path / name)

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass
class RunDir:
    """``runs/<name>/``: a folder of stages."""

    root: Path

    @classmethod
    def create(cls, runs_dir: str | Path, name: str) -> "RunDir":
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise UserError(f"run name {name!r} is not a valid folder name; pass --name with letters, digits, - or _")
        root = Path(runs_dir) / name
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def name(self) -> str:
        return self.root.name

    def stage(self, stage: str) -> StageDir:
        path = self.root / stage
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
        return StageDir(path, stage, manifest)

    def artifact(self, stage: str, name: str = "data.jsonl") -> Path:
        """Path of another stage's artifact; UserError if that stage has not completed."""
        st = self.stage(stage)
        if not st.complete or not st.file(name).exists():
            raise UserError(f"run '{self.name}' has no completed '{stage}' stage ({st.file(name)}); "
                            f"run that stage first (cai run CONFIG runs them in order)")
        return st.file(name)


@contextmanager
def stage_writer(stage: StageDir, name: str = "data.jsonl") -> Iterator[JsonlWriter]:
    w = stage.writer(name)
    try:
        yield w
    finally:
        w.close()


def todo(items: Iterable[Any], writer: JsonlWriter, key=lambda x: x.id) -> list[Any]:
    """Items whose id is not yet in ``writer``."""
    return [x for x in items if key(x) not in writer]
