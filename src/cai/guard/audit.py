"""What the guard records: an append-only JSONL audit log (one record per request) and Prometheus counters."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from pathlib import Path


def digest(text: str) -> str:
    """A short SHA-256 of ``text``: lets an auditor match records without storing the content."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class AuditLog:
    """Thread-safe JSONL appender; every line is flushed before ``write`` returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        line = json.dumps({"ts": round(time.time(), 3), **record}, ensure_ascii=False, default=str) + "\n"
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
        self.cost: Counter[str] = Counter()  # model calls, see supervisor.Cost
        self.latency_sum = 0.0
        self.in_flight = 0

    def observe(self, status: int, latency: float, decision: str | None = None, cost: dict | None = None) -> None:
        with self._lock:
            self.requests[str(status)] += 1
            self.latency_sum += latency
            if decision:
                self.decisions[decision] += 1
            self.cost.update(cost or {})

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP cai_guard_requests_total Chat completion requests by HTTP status.",
                     "# TYPE cai_guard_requests_total counter"]
            lines += [f'cai_guard_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            lines += ["# HELP cai_guard_decisions_total Released answers by guard decision.",
                      "# TYPE cai_guard_decisions_total counter"]
            lines += [f'cai_guard_decisions_total{{decision="{k}"}} {v}' for k, v in sorted(self.decisions.items())]
            lines += ["# HELP cai_guard_model_calls_total Model work done for requests.",
                      "# TYPE cai_guard_model_calls_total counter"]
            lines += [f'cai_guard_model_calls_total{{kind="{k}"}} {v}' for k, v in sorted(self.cost.items())]
            lines += ["# HELP cai_guard_request_seconds Time to answer a chat completion request.",
                      "# TYPE cai_guard_request_seconds summary",
                      f"cai_guard_request_seconds_sum {self.latency_sum:.6f}",
                      f"cai_guard_request_seconds_count {sum(self.requests.values())}",
                      "# HELP cai_guard_in_flight Requests admitted and not yet answered.",
                      "# TYPE cai_guard_in_flight gauge",
                      f"cai_guard_in_flight {self.in_flight}"]
        return "\n".join(lines) + "\n"
