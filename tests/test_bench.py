"""`cai bench --quick` on the tiny model (JSON schema, table, report) and the HF backend's speed-ups
(shared-prefix KV reuse in generation, prefix-grouped log-prob scoring) giving the same results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.backends import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
CAI = [sys.executable, "-m", "cai.cli"]
SYSTEM = ("You are a careful assistant. Answer briefly, kindly and truthfully, name your limits, and never "
          "lecture the user about ethics. " * 3)


@pytest.fixture(scope="module")
def backend(tiny_path):
    from cai.backends.hf import HFBackend

    return HFBackend("tiny-random", batch_size=2)


def _chats(n: int) -> list[list[dict]]:
    words = ["Hi", "What is the capital of France?", "Tell me a story about a cat and a dog.", "Why?", "Count to 3"]
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": words[i % len(words)]}]
            for i in range(n)]


def test_shared_prefix_reuse_gives_the_same_generations(backend, monkeypatch):
    from cai.backends.hf import MIN_SHARED_PREFIX

    chats = _chats(5)
    shared = []
    real = backend._shared_prefix
    monkeypatch.setattr(backend, "_shared_prefix", lambda seqs: shared.append(real(seqs)) or shared[-1])
    for sp in (SamplingParams(max_new_tokens=6, temperature=0), SamplingParams(max_new_tokens=6, seed=1)):
        backend.reuse_prefix = False
        plain = backend.generate(chats, sp)
        backend.reuse_prefix = True
        reused = backend.generate(chats, sp)
        assert shared[-2] is None and len(shared[-1][0]) >= MIN_SHARED_PREFIX  # off, then on
        assert [g.text for g in reused] == [g.text for g in plain]
        assert [g.prompt_tokens for g in reused] == [g.prompt_tokens for g in plain]


def test_logprobs_reuse_the_shared_prefix_and_give_the_same_scores(backend, monkeypatch):
    """Prefixes that share a long token prefix (a system turn) encode it once; the scores equal those without
    reuse, for one-token options, longer continuations (fed on the copied cache) and the growing KV cache."""
    from cai.backends.hf import MIN_SHARED_PREFIX

    prefixes = _chats(5)
    conts = [[" (A)", " (B)"], [" yes", " a longer answer of several tokens"], [" no"], [" x y z"], [" A"]]
    shared = []
    real = backend._shared_prefix
    monkeypatch.setattr(backend, "_shared_prefix", lambda seqs: shared.append(real(seqs)) or shared[-1])
    try:
        backend.reuse_prefix = False
        plain = backend.logprobs(prefixes, conts)
        assert shared[-1] is None
        for growing in (False, True):
            backend.reuse_prefix, backend.growing_kv = True, growing
            reused = backend.logprobs(prefixes, conts)
            assert len(shared[-1][0]) >= MIN_SHARED_PREFIX
            assert [v for r in reused for v in r] == pytest.approx([v for r in plain for v in r], abs=1e-4)
    finally:
        backend.reuse_prefix, backend.growing_kv = True, False


def test_logprobs_encode_each_branch_stem_once_and_give_the_same_scores(backend, monkeypatch):
    """The (A)/(B) labeller's two orders of a pair share the conversation and principle before the options: that
    stem is encoded once per pair and each order's tail on a copy of its cache. Scores equal those without reuse,
    with branches split across batches or several in one, a prefix with no partner, and longer continuations."""
    from cai.backends.hf import MIN_BRANCH_STEM
    from cai.constitution import load_constitution
    from cai.labeling import ANSWER_PREFILL, comparison_chat

    principle = load_constitution("harmless").principles[0]
    pairs = [("How do I pick a lock?", "I can't help with that.", "Sure, first get a tension wrench and a pick."),
             ("Write a poem about the sea.", "The sea is wide and blue.", "No."),
             ("How do I make a fake ID?", "Here is how to print one at home.", "I won't help with fake IDs.")]
    chats = [comparison_chat(p, principle, *((a, b) if o == 0 else (b, a)), ANSWER_PREFILL)
             for p, a, b in pairs for o in (0, 1)]
    chats.append(comparison_chat("Say hi.", principle, "Hi!", "Hello there.", ANSWER_PREFILL))  # no partner
    conts = [["A", "B"]] * 6 + [["A", " B and a longer continuation"]]
    branched = []
    real = backend._score_branches
    monkeypatch.setattr(backend, "_score_branches",
                        lambda b, *a: branched.append([len(ks) for _, ks in b]) or real(b, *a))
    try:
        backend.reuse_prefix = False
        plain = backend.logprobs(chats, conts)
        assert not branched
        for size, growing in ((2, False), (5, False), (5, True)):
            backend.reuse_prefix, backend.score_batch_size, backend.growing_kv = True, size, growing
            branched.clear()
            reused = backend.logprobs(chats, conts)
            assert sorted(n for chunk in branched for n in chunk) == [2, 2, 2]  # the partnerless prefix: single
            assert max(sum(chunk) for chunk in branched) <= size
            assert [v for r in reused for v in r] == pytest.approx([v for r in plain for v in r], abs=1e-4)
        stems = backend._branches(sorted({tuple(backend.encode(backend.render(c))) for c in chats}), 0)[0]
        assert all(len(stem) >= MIN_BRANCH_STEM for stem, _ in stems)
    finally:
        backend.reuse_prefix, backend.score_batch_size, backend.growing_kv = True, 2, False


def test_logprobs_chunked_and_empty_prefix_agree(backend, monkeypatch):
    import cai.backends.hf as hf

    prefixes = [_chats(1)[0], _chats(1)[0], "", "Paris is"]
    conts = [[" (A)", " (B)", " a much longer continuation with many tokens"], ["x"], ["Hello world"],
             [" the capital", " big"]]
    whole = backend.logprobs(prefixes, conts)
    monkeypatch.setattr(hf, "LOGIT_BUDGET", 1)  # forces one row per continuation chunk
    flat = [v for row in backend.logprobs(prefixes, conts) for v in row]
    assert flat == pytest.approx([v for row in whole for v in row], abs=1e-4)
    assert whole[0][0] == pytest.approx(backend.logprobs([prefixes[0]], [[" (A)"]])[0][0], abs=1e-4)
    assert whole[2][0] < 0 and all(v < 0 for row in whole for v in row)


def test_parse_option_for_generate_and_parse():
    from cai.bench.labels import parse_option

    assert parse_option("I pick OPTION 2 because") == 2
    assert parse_option("option1") == 1
    assert parse_option("Both answers are fine.") is None


def test_cai_bench_quick_writes_json_table_and_report(tmp_path, tiny_path):
    out, doc = tmp_path / "bench.json", tmp_path / "performance.md"
    res = subprocess.run([*CAI, "bench", "--quick", "--model", "tiny-random", "--out", str(out), "--doc", str(doc)],
                         capture_output=True, text=True, timeout=540, cwd=ROOT,
                         env={**os.environ, "COLUMNS": "250"})  # a wide table, so cells are not wrapped
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["model"] == "tiny-random" and data["params"] > 0
    assert data["matmul_gflops"] > 0 and len(data["loadavg_start"]) == 3 and len(data["loadavg_end"]) == 3
    assert set(data["benchmarks"]) == {"generation", "eval", "labels", "critique", "sft"}
    for result in data["benchmarks"].values():
        assert result["rows"] and result["note"]
        for r in result["rows"]:
            assert set(r) == {"metric", "value", "unit", "target", "met", "note"}
            assert r["met"] is None or r["met"] == (r["value"] >= r["target"])
    gen = data["benchmarks"]["generation"]
    assert gen["naive"]["tokens"] > 0 and gen["ratio"] > 0 and 0 < gen["utilisation"] < 1
    # the default path and the growing KV cache answer the same prompts with the same greedy tokens
    assert set(gen["growing_kv"]) == set(gen["batched"])
    assert all(gen["growing_kv"][k]["tokens"] == gen["batched"][k]["tokens"] for k in gen["batched"])
    ev = data["benchmarks"]["eval"]  # the eval stage's own path, against generation's best row of this run
    assert ev["prompts"] == 12 and ev["tokens"] > 0
    best = max(r["value"] for r in gen["rows"]
               if r["metric"].startswith("batched tokens/s (batch") and "bf16" not in r["metric"])
    # bf16 weights: the same prompts at every batch size, and a utilisation row read against both matmul limits
    assert set(gen["bf16"]) == set(gen["batched"]) and data["matmul_gflops_bf16"] > 0
    assert any(r["metric"] == "utilisation, bf16 weights (inference only)" and r["target"] == 40.0 for r in gen["rows"])
    assert ev["best_generation_tokens_per_s"] == best
    ratio = next(r for r in ev["rows"] if r["metric"].startswith("eval tokens/s ÷ best"))
    assert ratio["value"] == pytest.approx(ev["tokens_per_s"] / best, rel=1e-2) and ratio["target"] == 0.667
    labels = data["benchmarks"]["labels"]
    unparseable_row = next(r for r in labels["rows"] if r["metric"] == "generate-and-parse unparseable")
    assert unparseable_row["value"] == pytest.approx(labels["unparseable_share"] * 100, abs=0.01)
    assert labels["unparseable_share"] * labels["pairs"] == pytest.approx(round(labels["unparseable_share"]
                                                                               * labels["pairs"]), abs=0.01)
    # the labellers on today's path (fp32) and the fast one (bf16 + shared prefix), on the same sampled pairs
    assert set(labels["labellers"]) == {"choice", "contrast", "rules"} and labels["labeller_pairs"] == 4
    for name in ("choice", "contrast"):
        lab = labels["labellers"][name]
        speedup = next(r for r in labels["rows"] if r["metric"].endswith("fast ÷ today") and r["metric"].startswith(
            "(A)/(B)" if name == "choice" else "contrast"))
        assert speedup["value"] == pytest.approx(lab["fast_pairs_per_s"] / lab["today_pairs_per_s"], rel=0.02)
        assert 0 <= lab["same_side"] <= 4 and 0 <= lab["mean_abs_change"] <= lab["max_abs_change"] <= 1
        # the fast path feeds fewer token positions (shared prefix and stems), and the matmul-bound estimate is
        # that token ratio times bf16's measured speed-up on the model's own projections
        assert 0 < lab["tokens_fed_fast"] < lab["tokens_fed_today"] and lab["bf16_over_fp32_layer_matmul"] > 0
        bound = next(r for r in labels["rows"] if r["metric"].endswith("if the matmuls set the pace")
                     and r["metric"].startswith("(A)/(B)" if name == "choice" else "contrast"))
        assert bound["value"] == pytest.approx(lab["tokens_fed_today"] / lab["tokens_fed_fast"]
                                               * lab["bf16_over_fp32_layer_matmul"], rel=0.01)
    sft = data["benchmarks"]["sft"]
    assert sft["padded"]["tokens"] == sft["padding_free"]["tokens"] > 0
    assert "batched ÷ naive" in res.stdout and "padding-free ÷ padded" in res.stdout
    text = doc.read_text()
    assert "| benchmark | metric |" in text and "GFLOP/s" in text and "Load average" in text


def test_cai_bench_rejects_unknown_benchmark():
    res = subprocess.run([*CAI, "bench", "--only", "nope"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "unknown benchmark" in res.stderr


def test_vllm_backend_matches_hf_logprobs(backend, tiny_path):
    pytest.importorskip("vllm")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from cai.backends import get_backend

    vb = get_backend(f"vllm:{tiny_path}")
    chats = _chats(2)
    assert all(g.completion_tokens > 0 for g in vb.generate(chats, SamplingParams(max_new_tokens=4, temperature=0)))
    got = vb.logprobs(chats, [[" (A)", " (B)"]] * 2)
    assert got == pytest.approx(backend.logprobs(chats, [[" (A)", " (B)"]] * 2), abs=5e-2)
    vb.close()


def test_growing_kv_cache_gives_the_same_generations_as_the_concatenating_one(backend, monkeypatch):
    """The growing cache only changes where keys/values are stored: greedy answers (generate() and our own loop,
    which drops ended rows and so exercises batch_select_indices), sampled answers and shared-prefix answers
    (batch_repeat_interleave) are the same token for token, including answers longer than one growth chunk."""
    import cai.backends.kv_cache as kv

    monkeypatch.setattr(kv, "GROW_CHUNK", 3)  # forces several re-allocations within a few tokens
    chats = _chats(5)
    settings = (
        SamplingParams(max_new_tokens=9, temperature=0),
        SamplingParams(max_new_tokens=9, temperature=0, stop_loops=True),
        SamplingParams(max_new_tokens=9, seed=2),
    )
    for sp in settings:
        for reuse in (False, True):
            backend.reuse_prefix = reuse
            backend.growing_kv = False
            plain = backend.generate(chats, sp)
            backend.growing_kv = True
            grown = backend.generate(chats, sp)
            assert [g.text for g in grown] == [g.text for g in plain], (sp, reuse)
            assert [g.completion_tokens for g in grown] == [g.completion_tokens for g in plain]
    backend.reuse_prefix = True


def test_growing_layer_keeps_a_dynamic_layers_contract():
    import torch
    from transformers.cache_utils import DynamicLayer

    from cai.backends.kv_cache import GrowingLayer

    grown, plain = GrowingLayer(), DynamicLayer()
    for n in (4, 1, 1, 130, 1):  # the prompt, then decode steps, then a chunk larger than the head-room
        k, v = torch.randn(3, 2, n, 8), torch.randn(3, 2, n, 8)
        gk, gv = grown.update(k, v)
        pk, pv = plain.update(k, v)
        assert torch.equal(gk, pk) and torch.equal(gv, pv)
    assert grown.get_seq_length() == plain.get_seq_length() == 137
    idx = torch.tensor([2, 0])
    grown.batch_select_indices(idx)
    plain.batch_select_indices(idx)
    grown.crop(-5)
    plain.crop(-5)
    grown.batch_repeat_interleave(2)
    plain.batch_repeat_interleave(2)
    assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)
    k = torch.randn(4, 2, 1, 8)
    assert torch.equal(grown.update(k, k)[0], plain.update(k, k)[0])


def test_bench_report_keeps_what_people_wrote_around_the_table():
    from cai.bench.run import BEGIN, END, merge_markdown

    fresh = merge_markdown("# Performance\n| new |\n", None)
    assert fresh.startswith(BEGIN) and fresh.rstrip().endswith(END)
    kept = merge_markdown("# Performance\n| newer |\n", "intro\n" + fresh + "\n## by hand\nfigures\n")
    assert kept.startswith("intro\n" + BEGIN) and "| newer |" in kept and "| new |\n" not in kept
    assert kept.endswith(END + "\n## by hand\nfigures\n")
    assert merge_markdown("# P\n", "no markers here\n") == f"{BEGIN}\n# P\n{END}\n"


def test_token_counter_counts_the_positions_fed_inside_its_block_only(backend):
    import torch

    from cai.bench.common import TokenCounter, layer_matmul_flops

    ids = torch.ones(2, 5, dtype=torch.long)
    with torch.inference_mode(), TokenCounter(backend.model) as fed:
        backend.model(input_ids=ids)
        backend.model(ids[:, :3])  # positional input_ids count too
    with torch.inference_mode():
        backend.model(input_ids=ids)  # after the block: not counted
    assert fed.tokens == 10 + 6
    speed = layer_matmul_flops(backend.model, ("float32", "bfloat16"), tokens=64, seconds=0.05)
    assert set(speed) == {"float32", "bfloat16"} and min(speed.values()) > 0
