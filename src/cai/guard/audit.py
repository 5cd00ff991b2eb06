"""What the guard records: an append-only JSONL audit log (one record per request) and Prometheus counters."""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cai.errors import UserError

AUDIT_MAX_CHARS = 4096  # longest string kept in an audit field; longer ones are cut with a note of the length


def digest(text: str) -> str:
    """A short SHA-256 of ``text``: lets an auditor match records without storing the content."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def bounded(value: Any, max_chars: int = AUDIT_MAX_CHARS, max_items: int = 256) -> Any:
    """``value`` made safe for one JSON line: strings over ``max_chars`` cut (with the original length noted),
    lists and mappings cut to ``max_items`` entries, non-finite floats as strings ("nan", "inf"), anything
    else as its ``str``. Nothing an attacker sends can make a record unbounded or invalid JSON."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        if len(value) > max_chars:
            return f"{value[:max_chars]}…[{len(value)} chars]"
        return value
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k)[:128]: bounded(v, max_chars, max_items) for k, v in items[:max_items]}
        if len(items) > max_items:
            out["…"] = f"{len(items) - max_items} more keys"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [bounded(v, max_chars, max_items) for v in list(value)[:max_items]]
        if len(value) > max_items:
            out_list.append(f"…[{len(value) - max_items} more items]")
        return out_list
    return bounded(str(value), max_chars, max_items)


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_BEARER = re.compile(r"(?i)\b(bearer\s+)\S+")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without credentials: URL user:password parts, bearer tokens and the given secret strings."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _BEARER.sub(r"\1***", text)
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


class AuditLog:
    """Thread-safe JSONL appender; every line is flushed before ``write`` returns, and every line is one valid,
    bounded JSON object (see :func:`bounded`)."""

    def __init__(self, path: Path, max_chars: int = AUDIT_MAX_CHARS):
        self.path = Path(path)
        self.max_chars = max_chars
        if self.path.is_dir():
            raise UserError(
                f"--audit-log {self.path} is a directory; pass a file path such as "
                f"{self.path / 'guard-audit.jsonl'}"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise UserError(
                f"--audit-log {self.path} cannot be opened for appending ({exc.strerror or exc}); "
                "pass a writable file path"
            ) from None
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = (
            json.dumps(
                bounded({"ts": round(time.time(), 3), **record}, self.max_chars), ensure_ascii=False, allow_nan=False
            )
            + "\n"
        )
        line = line.encode("utf-8", "replace").decode("utf-8")  # lone surrogates from escaped JSON input
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class Metrics:
    """Counters and a latency summary, rendered in the Prometheus text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by HTTP status
        self.decisions: Counter[str] = Counter()  # pass | revised | refused
        self.errors: Counter[str] = Counter()  # by error code
        self.cost: Counter[str] = Counter()  # model calls, see supervisor.Cost
        self.latency_sum = 0.0
        self.in_flight = 0  # requests admitted to a check and not yet answered
        self.abandoned = 0  # checks past their deadline whose thread has not stopped yet
        self.connections = 0  # HTTP requests being handled

    def observe(
        self,
        status: int,
        latency: float,
        decision: str | None = None,
        cost: dict | None = None,
        error: str | None = None,
    ) -> None:
        with self._lock:
            self.requests[str(status)] += 1
            self.latency_sum += latency
            if decision:
                self.decisions[decision] += 1
            if error:
                self.errors[error] += 1
            self.cost.update({k: v for k, v in (cost or {}).items() if isinstance(v, int)})

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP cai_guard_requests_total Chat completion requests by HTTP status.",
                "# TYPE cai_guard_requests_total counter",
            ]
            lines += [f'cai_guard_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            lines += [
                "# HELP cai_guard_errors_total Chat completion requests answered with an error, by code.",
                "# TYPE cai_guard_errors_total counter",
            ]
            lines += [f'cai_guard_errors_total{{code="{k}"}} {v}' for k, v in sorted(self.errors.items())]
            lines += [
                "# HELP cai_guard_decisions_total Released answers by guard decision.",
                "# TYPE cai_guard_decisions_total counter",
            ]
            lines += [f'cai_guard_decisions_total{{decision="{k}"}} {v}' for k, v in sorted(self.decisions.items())]
            lines += [
                "# HELP cai_guard_model_calls_total Model work done for requests.",
                "# TYPE cai_guard_model_calls_total counter",
            ]
            lines += [f'cai_guard_model_calls_total{{kind="{k}"}} {v}' for k, v in sorted(self.cost.items())]
            lines += [
                "# HELP cai_guard_request_seconds Time to answer a chat completion request.",
                "# TYPE cai_guard_request_seconds summary",
                f"cai_guard_request_seconds_sum {self.latency_sum:.6f}",
                f"cai_guard_request_seconds_count {sum(self.requests.values())}",
                "# HELP cai_guard_in_flight Requests admitted and not yet answered.",
                "# TYPE cai_guard_in_flight gauge",
                f"cai_guard_in_flight {self.in_flight}",
                "# HELP cai_guard_abandoned_checks Checks past their deadline whose work has not stopped yet.",
                "# TYPE cai_guard_abandoned_checks gauge",
                f"cai_guard_abandoned_checks {self.abandoned}",
            ]
        return "\n".join(lines) + "\n"
