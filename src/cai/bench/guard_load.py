"""Load test of the guard server: N concurrent asyncio clients against `cai guard`'s real ASGI app (uvicorn, the
real AuditMiddleware, admission and deadline logic) with stub models that only sleep, so what is measured is the
server, not a model. Loopback (127.0.0.1) only, bounded by a request count and a time limit; stops by itself.

    .venv/bin/python -m cai.bench.guard_load --clients 200 --requests 4000 --out /tmp/guard-load.json

The server runs in a child process (this script with --serve) so that client and server do not share one GIL.
Reports requests/s, latency p50/p99 (all answers and 200s only), the shares of 200/429/503, and whether the
audit log has exactly one line per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HOST = "127.0.0.1"  # never anything else: a load test only targets this machine


# ---- server side (child process) ------------------------------------------------------------------------------
class SleepyBackend:
    """A stub model: generate sleeps ``gen_s`` and answers; logprobs sleeps ``score_s`` and says " No" (P=0.1)."""

    spec = "stub"

    def __init__(self, gen_s: float, score_s: float):
        self.gen_s, self.score_s = gen_s, score_s

    def generate(self, chats, sampling, *, progress=False):
        from cai.backends import Generation

        time.sleep(self.gen_s)
        return [Generation("A checked answer.", "stop", 12, 4) for _ in chats]

    def logprobs(self, prefixes, continuations, *, truncate=True):
        import math

        time.sleep(self.score_s)
        return [[math.log(0.1), math.log(0.9)] for _ in prefixes]

    def close(self):
        pass


def serve(args) -> None:
    import uvicorn

    from cai.constitution import load_constitution
    from cai.guard.audit import AuditLog
    from cai.guard.config import GuardConfig
    from cai.guard.server import bind_socket, create_app
    from cai.guard.supervisor import Guard

    cfg = GuardConfig(
        audit_log=Path(args.audit),
        workers=args.workers,
        max_pending=args.max_pending,
        request_timeout_s=args.timeout,
        host=HOST,
        port=0,
    )
    constitution = load_constitution("harmless")
    principles = [constitution.principle(n) for n in ("harmlessness", "peace", "safe_advice", "lawfulness")]
    guard = Guard(
        SleepyBackend(args.policy_ms / 1000, 0),
        SleepyBackend(0, args.supervisor_ms / 1000),
        constitution,
        principles,
        threshold=0.5,
        max_rounds=2,
    )
    audit = AuditLog(cfg.audit_log)
    sock = bind_socket(HOST, 0)
    print(sock.getsockname()[1], flush=True)
    try:
        uvicorn.Server(uvicorn.Config(create_app(guard, cfg, audit), log_level="error", timeout_keep_alive=5)).run(
            sockets=[sock]
        )
    except KeyboardInterrupt:  # the parent's SIGINT, after uvicorn's graceful shutdown
        pass
    finally:
        audit.close()


# ---- client side ----------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


async def hammer(url: str, clients: int, requests: int, seconds: float) -> tuple[list, float]:
    import httpx

    results: list[tuple[object, float]] = []
    issued = 0
    t_end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:

        async def one_client() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < t_end:
                issued += 1
                body = {
                    "model": "cai-guard",
                    "messages": [{"role": "user", "content": f"Question {issued}?"}],
                    "max_tokens": 16,
                    "seed": issued,
                }
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    status: object = r.status_code
                    if not r.headers.get("content-type", "").startswith("application/json"):
                        status = f"{r.status_code} (not JSON)"
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                results.append((status, time.perf_counter() - t0))

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200, help="concurrent clients (asyncio tasks, one connection each)")
    ap.add_argument("--requests", type=int, default=4000, help="total requests, all clients together")
    ap.add_argument("--seconds", type=float, default=120.0, help="stop sending after this long")
    ap.add_argument("--workers", type=int, default=4, help="guard workers (checks at once)")
    ap.add_argument("--max-pending", type=int, default=32, help="guard admission limit (more get 429)")
    ap.add_argument("--timeout", type=float, default=30.0, help="guard request deadline, seconds")
    ap.add_argument("--policy-ms", type=float, default=20.0, help="stub policy time per answer")
    ap.add_argument("--supervisor-ms", type=float, default=10.0, help="stub supervisor time per check")
    ap.add_argument("--out", type=Path, help="write the summary as JSON here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--audit", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args)
        return {}

    import httpx

    tmp = tempfile.TemporaryDirectory(prefix="guard-load-")
    audit = Path(tmp.name) / "audit.jsonl"
    child = [
        sys.executable,
        "-m",
        "cai.bench.guard_load",
        "--serve",
        "--audit",
        str(audit),
        "--workers",
        str(args.workers),
        "--max-pending",
        str(args.max_pending),
        "--timeout",
        str(args.timeout),
        "--policy-ms",
        str(args.policy_ms),
        "--supervisor-ms",
        str(args.supervisor_ms),
    ]
    # the child imports the same cai as this process (a checkout's src/ or an installed wheel)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])
        ),
    }
    server = subprocess.Popen(child, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None  # Popen(stdout=PIPE) always has it
        port = int(server.stdout.readline())
        base = f"http://{HOST}:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        results, wall = asyncio.run(hammer(f"{base}/v1/chat/completions", args.clients, args.requests, args.seconds))
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    lines = audit.read_text(encoding="utf-8").split("\n")
    records = [json.loads(line) for line in lines if line]
    codes = Counter(str(s) for s, _ in results)
    n = len(results)
    lat = [t for _, t in results]
    ok = [t for s, t in results if s == 200]
    audited = Counter(str(r["status"]) for r in records)
    summary = {
        "clients": args.clients,
        "requests": n,
        "seconds": round(wall, 2),
        "requests_per_s": round(n / wall, 1),
        "ok_per_s": round(len(ok) / wall, 1),
        "latency_ms": {
            "p50": round(1000 * percentile(lat, 0.5), 1),
            "p99": round(1000 * percentile(lat, 0.99), 1),
            "mean": round(1000 * statistics.fmean(lat), 1) if lat else None,
        },
        "latency_200_ms": {"p50": round(1000 * percentile(ok, 0.5), 1), "p99": round(1000 * percentile(ok, 0.99), 1)},
        "status": dict(sorted(codes.items())),
        "share": {k: round(v / n, 4) for k, v in sorted(codes.items())},
        "errors_by_code": dict(sorted(Counter(r["error"] for r in records if r.get("error")).items())),
        "audit_lines": len(records),
        "audit_by_status": dict(sorted(audited.items())),
        "audit_equals_requests": len(records) == n and audited == codes,
        "metrics_requests_total": sum(
            int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("cai_guard_requests_total{")
        ),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "server": {
            "workers": args.workers,
            "max_pending": args.max_pending,
            "timeout_s": args.timeout,
            "policy_ms": args.policy_ms,
            "supervisor_ms": args.supervisor_ms,
            "principles": 4,
        },
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
