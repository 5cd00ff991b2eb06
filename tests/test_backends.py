import math

import pytest

from cai.backends import SamplingParams, choice_probs, get_backend, truncate_at_stop
from cai.backends.openai import LogprobsUnsupported, OpenAIBackend
from cai.errors import UserError
from tests.fake_openai_server import ServerThread, make_app

CHATS = [[{"role": "user", "content": "Hello there, how are you today?"}],
         [{"role": "user", "content": "Hi"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour and a fruit."}]]


def test_truncate_and_choice_probs():
    assert truncate_at_stop("abc STOP def", ["STOP"]) == ("abc ", True)
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)
    p = choice_probs([math.log(0.2), math.log(0.6)])
    assert p == pytest.approx([0.25, 0.75])


def test_greedy_batch_equals_one_by_one(tiny_backend):
    sp = SamplingParams(max_new_tokens=8, temperature=0)
    batched = tiny_backend.generate(CHATS, sp)
    single = [tiny_backend.generate([c], sp)[0] for c in CHATS]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.completion_tokens <= 8 and g.prompt_tokens > 0 for g in batched)


def test_sampling_is_seeded(tiny_backend):
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    a = tiny_backend.generate(CHATS, sp)
    b = tiny_backend.generate(CHATS, sp)
    assert [g.text for g in a] == [g.text for g in b]


def test_prefill_continues_assistant_turn(tiny_backend):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, here"}]
    rendered = tiny_backend.render(chat)
    assert rendered.endswith("Sure, here")
    assert tiny_backend.generate([chat], SamplingParams(max_new_tokens=4, temperature=0))[0].completion_tokens > 0


def test_too_long_prompt_is_an_item_error_not_a_crash(tiny_backend):
    long_chat = [{"role": "user", "content": "word " * 3000}]
    out = tiny_backend.generate([long_chat, CHATS[1]], SamplingParams(max_new_tokens=4, temperature=0))
    assert out[0].finish_reason == "error" and out[1].finish_reason != "error"


def test_logprobs_match_unbatched_forward(tiny_backend):
    import torch

    prefixes = [CHATS[0], "The capital of France is", CHATS[2]]
    conts = [[" (A)", " (B)"], [" Paris", " a long answer here"], ["Red"]]
    got = tiny_backend.logprobs(prefixes, conts)
    tok, model = tiny_backend.tokenizer, tiny_backend.model
    for i, p in enumerate(prefixes):
        pids = tok(tiny_backend.render(p), add_special_tokens=False)["input_ids"]
        for j, c in enumerate(conts[i]):
            cids = tok(c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([pids + cids])
            with torch.inference_mode():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            want = sum(float(lp[len(pids) + k - 1, t]) for k, t in enumerate(cids))
            assert got[i][j] == pytest.approx(want, abs=1e-3)


def test_openai_backend_against_loopback_server(tiny_backend):
    with ServerThread(make_app(tiny_backend, fail_first=1)) as srv:
        be = get_backend(f"openai:tiny@{srv.url}", concurrency=2)
        assert isinstance(be, OpenAIBackend)
        out = be.generate(CHATS[:2], SamplingParams(max_new_tokens=6, temperature=0))
        local = tiny_backend.generate(CHATS[:2], SamplingParams(max_new_tokens=6, temperature=0))
        assert [g.text for g in out] == [g.text for g in local]  # the 503 on the first call was retried
        remote = be.logprobs([CHATS[0]], [[" (A)", " (B)"]])
        ref = tiny_backend.logprobs([CHATS[0]], [[" (A)", " (B)"]])
        assert remote[0] == pytest.approx(ref[0], abs=1e-3)
        be.close()


def test_openai_without_tokenize_gives_clear_error(tiny_backend):
    with ServerThread(make_app(tiny_backend, with_tokenize=False)) as srv:
        be = OpenAIBackend("openai:x@" + srv.url, "x", [srv.url], retries=0)
        with pytest.raises(LogprobsUnsupported, match="revision, contrastive"):
            be.logprobs([CHATS[0]], [[" (A)"]])


def test_unreachable_server_is_a_user_error():
    be = OpenAIBackend("openai:x@http://127.0.0.1:9/v1", "x", ["http://127.0.0.1:9/v1"], retries=1, timeout=2)
    with pytest.raises(UserError, match="unreachable"):
        be.generate(CHATS[:1], SamplingParams(max_new_tokens=2))
