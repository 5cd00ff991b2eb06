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
    """A run folder with the artifacts the report reads: eval metrics + samples of three checkpoints, Elo, the
    trainers' logs (SFT loss, RL reward/KL/lengths, a data CSV and the RL stage's own PNG), preferences and their
    diagnostics (weak: labels follow position)."""
    from cai.evaluation.evaluate import compute_metrics
    from cai.runs import write_json

    run = root / "demo"
    for stage in ("prompts", "sft", "rl", "preferences", "eval"):
        write_json(run / stage / "manifest.json", {"stage": stage, "status": "complete", "counts": {"items": 4},
                                                   "timings": {"total_s": 1.5},
                                                   "skipped": [{"id": "x1", "reason": "too long"}] if stage == "sft" else []})
    write_json(run / "eval" / "manifest.json", {"stage": "eval", "status": "complete", "skipped": [],
                                                "counts": {"checkpoints": ["base", "sl", "rl"]}})
    for label, refuse in (("base", 1), ("sl", 3), ("rl", 2)):
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
    write_json(run / "rl" / "log_history.json", [
        {"step": s, "loss": 0.01 * s, "reward": 0.5 + s / 20, "reward_std": 0.1, "kl": s / 1000,
         "completions/mean_length": 30 - s, "completions/min_length": 20 - s, "completions/max_length": 32,
         "grad_norm": 9.0} for s in range(1, 6)] + [{"step": 5, "train_loss": 0.02, "train_runtime": 9.0}])
    (run / "rl" / "samples.csv").write_text("step,prompt,response,reward\n1,hi,hello,0.5\n2,hi,hey,0.7\n")
    (run / "rl" / "curves.png").write_bytes(b"not drawn: the report redraws rl's log")
    write_json(run / "preferences" / "diagnostics.json", {
        "n": 8, "swap_consistency": {"rate": 0.125, "ci_low": 0.02, "ci_high": 0.47, "n": 8},
        "label_entropy_bits": 0.99, "mean_confidence": 0.52, "position_bias_first": 0.8})
    (run / "preferences" / "data.jsonl").write_text("".join(
        json.dumps({"id": str(i), "p_chosen": 0.5 + i / 20, "swap_consistent": i % 2 == 0, "source": "judge"}) + "\n"
        for i in range(8)))
    return run


def test_training_logs_are_grouped_one_metric_family_per_axis():
    from cai.evaluation.training_curves import panels

    rows = [{"step": s, "loss": 1 / s, "eval_loss": 2 / s, "reward": 0.5, "reward_std": 0.1, "kl": 0.01,
             "completions/mean_length": 30, "completions/min_length": 10, "completions/max_length": 40,
             "learning_rate": 1e-4} for s in (1, 2)] + [{"train_loss": 0.3}]
    got = {p.family: p for p in panels(rows)}
    assert list(got) == ["loss", "reward", "kl", "length"]  # learning rate and the end-of-run summary are left out
    assert [s.label for s in got["loss"].series] == ["train loss", "held-out loss"]
    reward = got["reward"].series[0]
    assert reward.band is not None and reward.band[0] == [0.4, 0.4] and reward.band[1] == [0.6, 0.6]
    assert got["length"].series[0].band[:2] == ([10.0, 10.0], [40.0, 40.0])


def test_report_renders_in_headless_chromium(tmp_path):
    from cai.evaluation.report import write_report

    html_path = write_report([_fake_run(tmp_path)], tmp_path / "out")
    html = html_path.read_text()
    assert html.count("<img") >= 5 and "http://" not in html and "https://" not in html  # self-contained
    assert "<script src" not in html and "<link" not in html
    # curves: one figure per training log, drawn from the log (not the trainer's own PNG, not the data CSV)
    assert "rl (log_history.json)" in html and "sft (log_history.json)" in html
    assert "samples.csv" not in html and "rl/curves.png" not in html
    # the sample viewer: one row per prompt, one answer cell per checkpoint
    assert html.count("class='vrow'") == 5 and html.count("<td class='ans'>") == 15
    assert "<th>base</th><th>sl</th><th>rl</th>" in html
    # feedback diagnostics with the warning in words; the paired tests
    assert "Weak feedback: only 12% of pairs keep their label" in html and "swap consistency" in html
    assert "Paired comparisons" in html and "McNemar" in html
    assert "harmful &lt;b&gt;0&lt;/b&gt;" in html  # transcripts are escaped
    assert "too long" in html  # skipped items are listed
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| demo | sl |" in summary and "Elo" in summary

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed and could not be installed (apt-get install -y chromium)")
    profile = tmp_path / "profile"
    url = html_path.resolve().as_uri()
    dom = subprocess.run([browser, *FLAGS, "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "cai-lab report: demo" in dom.stdout, dom.stderr[-1000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console  # no console messages: no script errors, no warnings
    assert 'data-js-errors="' not in dom.stdout  # the page's error hook saw nothing
    assert 'data-shown="5"' in dom.stdout and "5 of 5 prompts" in dom.stdout  # the viewer's script ran

    def shown(fragment: str) -> int:
        """Rows the viewer shows with its filters set from the URL fragment, as the page's own script does."""
        out = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", f"{url}#{fragment}"],
                             capture_output=True, text=True, timeout=120).stdout
        assert 'data-js-errors="' not in out
        return int(out.split('data-shown="')[1].split('"')[0])

    assert shown("verdict=complied&checkpoint=sl") == 2  # sl answers harmful 3 and the benign prompt
    assert shown("verdict=refused&checkpoint=base&set=harmful") == 1
    assert shown("differ=1") == 2  # harmful 1 and 2: base, sl and rl disagree
    assert shown("text=capital") == 1
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
