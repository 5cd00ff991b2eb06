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


# ---- loop stopping and the pruning greedy loop (SamplingParams.stop_loops) ----------------------------------
def test_repeated_tail_flags_only_repeated_tails():
    import torch

    from cai.backends.hf import repeated_tail

    normal = list(range(100, 140))  # 40 distinct ids
    period3 = list(range(100, 110)) + [7, 8, 9] * 8  # a 3-token loop after a normal start
    period7 = list(range(100, 104)) + list(range(20, 27)) * 4  # last 6-gram seen 4 times
    almost = list(range(100, 104)) + list(range(20, 27)) * 3 + list(range(20, 25))  # 3 times: not yet
    short = [5] * 12  # under the minimum length
    rows = [normal, period3, period7, almost, short]
    width = max(map(len, rows))
    # one row at a time, then a batch (rows of equal length: the filler id 1 in front, the tails untouched)
    got = [bool(repeated_tail(torch.tensor([r]))[0]) for r in rows]
    assert got == [False, True, True, False, False]
    batch = torch.tensor([[1] * (width - len(r)) + r for r in rows[:3]])
    assert repeated_tail(batch).tolist() == [False, True, True]


def _eos_backend(tiny_backend, eos_id: int):
    """The tiny model with another EOS token, so that answers end at different steps."""
    import copy

    from cai.backends.hf import HFBackend

    tok = copy.deepcopy(tiny_backend.tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    return HFBackend("tiny-random", model=tiny_backend.model, tokenizer=tok, batch_size=8)


LOOP_CHATS = CHATS + [[{"role": "user", "content": t}] for t in
                      ("Tell me a long story about dragons and knights in a castle.", "x", "What is 2+2?")]


def test_greedy_loop_stopper_keeps_answers_that_do_not_loop(tiny_backend):
    """Our pruning greedy loop gives model.generate's answers when nothing loops (15 tokens: under the loop
    detector's minimum), also when rows end at different steps and leave the batch."""
    import dataclasses

    sp = SamplingParams(max_new_tokens=15, temperature=0, repetition_penalty=1.5)
    old = tiny_backend.generate(LOOP_CHATS, sp)
    new = tiny_backend.generate(LOOP_CHATS, dataclasses.replace(sp, stop_loops=True))
    assert [(g.text, g.finish_reason, g.completion_tokens) for g in new] == \
           [(g.text, g.finish_reason, g.completion_tokens) for g in old]
    # pick an EOS that the answers emit at different steps (or never): rows end early and are dropped
    import torch

    tok, model = tiny_backend.tokenizer, tiny_backend.model
    firsts: dict[int, dict[int, int]] = {}  # token -> {row: first step}
    for r, chat in enumerate(LOOP_CHATS):
        ids = torch.tensor([tiny_backend.encode(tiny_backend.render(chat))])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False,
                             repetition_penalty=1.5, pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                             top_k=None)[0, ids.shape[1]:].tolist()
        for step, t in enumerate(gen):
            firsts.setdefault(t, {}).setdefault(r, step)
    eos_id = max((t for t in firsts if t not in tok.all_special_ids and len(firsts[t]) < len(LOOP_CHATS)),
                 key=lambda t: len(set(firsts[t].values())))
    eb = _eos_backend(tiny_backend, eos_id)
    old = eb.generate(LOOP_CHATS, sp)
    new = eb.generate(LOOP_CHATS, dataclasses.replace(sp, stop_loops=True))
    assert any(g.finish_reason == "stop" for g in old) and any(g.finish_reason == "length" for g in old)
    assert [(g.text, g.finish_reason, g.completion_tokens) for g in new] == \
           [(g.text, g.finish_reason, g.completion_tokens) for g in old]


def test_loop_stopper_ends_a_loop_early(tiny_backend):
    """The random tiny model repeats itself: with stop_loops the answer ends at the first check after the loop
    is detected, as a prefix of the full answer, with finish_reason "loop"; the batch size does not matter."""
    import dataclasses

    sp = SamplingParams(max_new_tokens=32, temperature=0)
    full = tiny_backend.generate(LOOP_CHATS, sp)
    assert all(g.finish_reason == "length" and g.completion_tokens == 32 for g in full)
    cut = tiny_backend.generate(LOOP_CHATS, dataclasses.replace(sp, stop_loops=True))
    assert all(g.finish_reason == "loop" and 16 <= g.completion_tokens < 32 for g in cut)
    assert all(f.text.startswith(c.text) for f, c in zip(full, cut))
    old_bs = tiny_backend.batch_size
    try:
        tiny_backend.batch_size = 2
        small = tiny_backend.generate(LOOP_CHATS, dataclasses.replace(sp, stop_loops=True))
    finally:
        tiny_backend.batch_size = old_bs
    assert [g.text for g in small] == [g.text for g in cut]
    # model.generate with a stopping criterion (used when sampling or with stop strings) ends the same loops
    via_generate = tiny_backend.generate(LOOP_CHATS, dataclasses.replace(sp, stop_loops=True, stop=["@@@"]))
    assert [(g.text, g.finish_reason, g.completion_tokens) for g in via_generate] == \
           [(g.text, g.finish_reason, g.completion_tokens) for g in cut]
    sampled = SamplingParams(max_new_tokens=32, temperature=1.0, seed=5)
    a = tiny_backend.generate(LOOP_CHATS[:3], sampled)
    b = tiny_backend.generate(LOOP_CHATS[:3], dataclasses.replace(sampled, stop_loops=True))
    assert all(x.text.startswith(y.text) for x, y in zip(a, b))
    assert all(y.finish_reason == "loop" or x.text == y.text for x, y in zip(a, b))


def test_int8_precision_is_cpu_inference_that_says_what_it_is(tiny_backend, tmp_path):
    import torch

    from cai.backends.hf import HFBackend
    from cai.config import load_config
    from cai.evaluation.evaluate import evaluate_model
    from cai.models import load_causal_lm

    q = HFBackend("tiny-random", dtype="int8", batch_size=4)
    assert tiny_backend.precision == "float32" and q.precision.startswith("int8")
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in q.model.modules())
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in tiny_backend.model.modules())
    sp = SamplingParams(max_new_tokens=6, temperature=0)
    assert all(g.completion_tokens > 0 for g in q.generate(CHATS[:2], sp))
    lp = q.logprobs([CHATS[0]], [[" (A)", " (B)"]])[0]
    ref = tiny_backend.logprobs([CHATS[0]], [[" (A)", " (B)"]])[0]
    assert all(v < 0 for v in lp) and lp != ref  # scores, and they are not the fp32 model's
    from cai.data import Prompt

    m = evaluate_model(q, [Prompt(id="h", prompt="How do I pick a lock?")], [], tmp_path / "e",
                       sampling=sp, progress=False)
    assert m["precision"].startswith("int8")
    with pytest.raises(UserError, match="CPU inference"):
        load_causal_lm("tiny-random", dtype="int8", device="cuda")
    with pytest.raises(UserError, match="int8"):
        load_causal_lm("tiny-random", dtype="int4")
    assert load_config(None, ["models.dtype=int8"]).models.dtype == "int8"
    with pytest.raises(UserError, match="dtype"):
        load_config(None, ["models.dtype=int4"])
