"""Run directories, manifests and append-only JSONL artifacts that survive kills.

Layout: ``runs/<name>/<stage>/`` holds the stage's JSONL artifacts and ``manifest.json``. Items are appended
one line each and flushed; on resume a torn last line (a process killed mid-write) is cut off and ids already
present are skipped, so no item is duplicated or lost.

One writer per folder: a run folder and each stage folder is locked (an OS lock on ``.cai.lock``, see
:func:`lock_folder`) by the process that writes it, for the life of that process. A second ``cai`` process
exits with a one-line error naming the holder's pid; the kernel drops the lock of a killed process, so a stale
lock file is simply taken over.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".cai.lock"


# ---- one writer per folder -------------------------------------------------------------------------------------
_held: dict[str, int] = {}  # real path of a locked folder -> the open lock file descriptor (held until exit)
_held_lock = threading.Lock()


def _try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking OS lock on ``fd``; False when another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _secondary_rank() -> bool:
    """True in the non-main processes of a distributed launch: they share the main process's run folders."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return rank.strip() not in ("", "0")


def _holder(path: Path) -> str:
    """Who holds a lock, from what the holder wrote into the lock file."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (pid unknown)"
    where = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    cmd = f": {str(info['command'])[:120]}" if info.get("command") else ""
    return f"pid {info['pid']}{where}, since {info.get('since', '?')}{cmd}"


def lock_folder(folder: str | Path) -> Path:
    """Make this process the one writer of ``folder``: an exclusive OS lock on ``folder/.cai.lock``, held until
    the process exits (or :func:`unlock_folder`). Re-entrant within the process. A folder locked by another
    live process is a UserError naming its pid; a lock file left by a killed process is taken over (the kernel
    released its lock), and rewritten with this process's pid."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if _secondary_rank():
        return folder / LOCK_NAME  # the rank-0 process of an `accelerate launch` / torchrun job holds it
    with _held_lock:
        if key in _held:
            return folder / LOCK_NAME
        path = folder / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{folder}: cannot create its lock file ({exc.strerror}); pass a writable folder") from None
        if not _try_lock(fd):
            os.close(fd)
            raise UserError(
                f"{folder} is being written by another cai process ({_holder(path)}); wait for it to "
                "finish or stop it, then rerun (two writers would duplicate every record)"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500] if sys.argv else "",
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        _held[key] = fd
        return path


def unlock_folder(folder: str | Path) -> None:
    """Release this process's lock on ``folder`` (a no-op when it holds none)."""
    with _held_lock:
        fd = _held.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the OS lock


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


def make_folder(path: Path, what: str = "folder") -> None:
    """``mkdir -p`` with one-line errors: a file in the way, no permission."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {what} {path} ({exc.strerror or exc}); pass a writable folder") from None


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    """A spreadsheet view of an artifact: one row per record, ``columns`` in order (other keys ignored, missing
    ones empty); written atomically like :func:`atomic_write_text`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, list(columns), extrasaction="ignore")
        out.writeheader()
        out.writerows(rows)
    os.replace(tmp, path)


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
    for n, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's limit
            raise UserError(
                f"{path}:{n}: corrupt JSONL line; delete the file or rerun the stage with --force"
            ) from None
    return records


class JsonlWriter:
    """Append-only JSONL file keyed by ``id``: resumes where a killed process stopped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = read_jsonl(self.path, repair=True)
        self.done: set[str] = set()
        self.records = []
        for r in records:
            rid = str(r.get("id") if isinstance(r, dict) else None)
            if rid not in self.done:
                self.done.add(rid)
                self.records.append(r)
        if len(self.records) < len(records):  # left by two writers at once (before folders were locked): repair
            log.warning(
                "%s: dropped %d duplicate records (kept the first of each id)",
                self.path,
                len(records) - len(self.records),
            )
            atomic_write_text(
                self.path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in self.records)
            )
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

    def __enter__(self) -> JsonlWriter:
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

    def begin(
        self,
        config: dict[str, Any],
        *,
        force: bool = False,
        run_name: str = "",
        elsewhere: str = "--name NEW for a new run",
    ) -> None:
        """Start or resume the stage, as the one writer of its folder (see :func:`lock_folder`). A different
        config under an existing stage is refused unless ``force`` (which recomputes the stage from scratch,
        after moving the old files aside); ``elsewhere`` tells how the command starts afresh somewhere else."""
        make_folder(self.path, "stage folder")
        lock_folder(self.path)
        try:
            old = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None
        except (OSError, ValueError):
            raise UserError(
                f"{self.manifest_path} is not a readable manifest; pass --force to recompute the stage "
                "or delete the folder"
            ) from None
        new_hash = config_hash(config)
        if old and old.get("config_hash") != new_hash:
            if not force:
                # compared as the manifest stores it: a tuple and the list it was saved as are the same value
                changes = _diff(old.get("config", {}), json.loads(json.dumps(config, default=str)))
                shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
                raise UserError(
                    f"stage '{self.stage}' of run '{run_name or self.path.parent.name}' was made with a different "
                    f"config ({shown}); pass --force to recompute it or {elsewhere}"
                )
            backup = self.path.with_name(f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            backup.mkdir()
            for child in self.path.iterdir():  # everything but the lock this process holds
                if child.name != LOCK_NAME:
                    os.replace(child, backup / child.name)
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
        self.manifest["timings"]["total_s"] = round(
            self.manifest["timings"].get("total_s", 0) + time.time() - self._t0, 2
        )
        self.manifest.update(extra, status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()
        unlock_folder(self.path)  # this stage's writer is done (a run folder stays locked by its process)

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
    def create(cls, runs_dir: str | Path, name: str) -> RunDir:
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise UserError(f"run name {name!r} is not a valid folder name; pass --name with letters, digits, - or _")
        root = Path(runs_dir) / name
        make_folder(root, "run folder")
        lock_folder(root)
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
            raise UserError(
                f"run '{self.name}' has no completed '{stage}' stage ({st.file(name)}); "
                f"run that stage first (cai run CONFIG runs them in order)"
            )
        return st.file(name)


# ---- the one orchestration primitive ----------------------------------------------------------------------------
@dataclass
class Step:
    """What :func:`run_step` did: the step's folder, whether a complete step was reused (then ``value`` is None),
    what the step function returned, and how long it took."""

    stage: StageDir
    reused: bool
    value: Any = None
    seconds: float = 0.0


def run_step(
    run: RunDir,
    name: str,
    config: dict[str, Any],
    fn: Callable[[StageDir], Any],
    *,
    force: bool = False,
    revision: str | None = None,
) -> Step:
    """Run ``fn(stage)`` in the step folder ``run/name`` unless a complete step with the same config hash exists
    (then ``fn`` is not called). Pipeline stages and experiment steps both go through here, so "complete with the
    same config → reuse" means one thing everywhere. ``fn`` runs after :meth:`StageDir.begin` (which refuses a
    changed config unless ``force``) and marks the step complete with :meth:`StageDir.finish`; a step it leaves
    unfinished (killed, or a secondary rank) runs again, resuming from its flushed artifacts.

    ``revision`` names what shapes the result besides the config, and can change under a finished step: the judge
    that labels an evaluation's answers (``refusal@v3``). A complete step recorded under another revision runs
    again *in place* — same folder, its answers kept and only re-labelled — rather than being reused stale or
    recomputed from scratch."""
    stage = run.stage(name)
    unchanged = stage.complete and not force and stage.manifest.get("config_hash") == config_hash(config)
    if unchanged and (revision is None or stage.manifest.get("revision") == revision):
        return Step(stage, reused=True)
    t0 = time.time()
    stage.begin(config, force=force, run_name=run.name)
    if revision is not None:
        stage.manifest["revision"] = revision
    value = fn(stage)
    return Step(stage, reused=False, value=value, seconds=round(time.time() - t0, 1))
