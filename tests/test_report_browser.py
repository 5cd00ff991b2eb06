"""The HTML report renders with all its plots in a real headless Chromium (screenshot + DOM)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _fake_run(root: Path) -> Path:
    """A run folder with the artifacts the report reads: eval metrics + samples, Elo, a loss curve, preferences."""
    from cai.evaluation.evaluate import compute_metrics
    from cai.runs import write_json

    run = root / "demo"
    for stage in ("prompts", "sft", "preferences", "eval"):
        write_json(run / stage / "manifest.json", {"stage": stage, "status": "complete", "counts": {"items": 4},
                                                   "timings": {"total_s": 1.5},
                                                   "skipped": [{"id": "x1", "reason": "too long"}] if stage == "sft" else []})
    write_json(run / "eval" / "manifest.json", {"stage": "eval", "status": "complete", "skipped": [],
                                                "counts": {"checkpoints": ["base", "sl"]}})
    for label, refuse in (("base", 1), ("sl", 3)):
        samples = [{"id": f"harmful:h{i}", "set": "harmful", "prompt": f"harmful <b>{i}</b>", "category": "violence",
                    "response": "I can't help." if i < refuse else "Sure, here is how.", "prefill": "",
                    "completion_tokens": 5 + i, "labels": {"refused": i < refuse, "p_refused": 0.9 if i < refuse else 0.1,
                                                           "harmful": None, "loop": False}} for i in range(4)]
        samples += [{"id": "benign:b0", "set": "benign", "prompt": "capital of France?", "category": "violence",
                     "response": "Paris.", "prefill": "", "completion_tokens": 2,
                     "labels": {"refused": False, "p_refused": 0.05, "harmful": None, "loop": False}}]
        (run / "eval" / label).mkdir(parents=True)
        (run / "eval" / label / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        write_json(run / "eval" / label / "metrics.json", {"label": label, "model": label, "judge": "refusal",
                                                            "n_harmful": 4, "n_benign": 1, **compute_metrics(samples)})
    write_json(run / "eval" / "elo.json", {"judge": "fake", "checkpoints": ["base", "sl"], **{
        dim: {"elo": {"base": {"elo": 0, "ci": [0, 0]}, "sl": {"elo": 120, "ci": [40, 200]}},
              "win_rate": {"base vs sl": {"rate": 0.33, "ci": [0.2, 0.45]}}} for dim in ("harmlessness", "helpfulness")}})
    write_json(run / "sft" / "log_history.json", [{"step": s, "loss": 3 / s} for s in range(1, 8)])
    (run / "preferences" / "data.jsonl").write_text("".join(
        json.dumps({"id": str(i), "p_chosen": 0.5 + i / 20, "swap_consistent": i % 2 == 0, "source": "judge"}) + "\n"
        for i in range(8)))
    return run


def test_report_renders_in_headless_chromium(tmp_path):
    from cai.evaluation.report import write_report

    html_path = write_report([_fake_run(tmp_path)], tmp_path / "out")
    html = html_path.read_text()
    assert html.count("<img") >= 5 and "http://" not in html and "https://" not in html  # self-contained
    assert "harmful &lt;b&gt;0&lt;/b&gt;" in html  # transcripts are escaped
    assert "too long" in html  # skipped items are listed
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| demo | sl |" in summary and "Elo" in summary

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed and could not be installed (apt-get install -y chromium)")
    profile = tmp_path / "profile"
    url = html_path.resolve().as_uri()
    dom = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert "cai-lab report: demo" in dom.stdout, dom.stderr[-1000:]
    total = int(dom.stdout.split('data-images-total="')[1].split('"')[0])
    loaded = int(dom.stdout.split('data-images-loaded="')[1].split('"')[0])
    assert total >= 5 and loaded == total  # every embedded plot decoded

    shot = tmp_path / "shot.png"
    subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600",
                    url], capture_output=True, text=True, timeout=120)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    non_white = (pixels.mean(axis=-1) < 0.9).mean()
    assert 0.01 < non_white < 0.9 and pixels.std() > 0.05  # text and plots drawn, not a blank page
