"""Constrained decoding (cai.backends.constraints): every path through the number-list automaton is a valid list,
and the HF backend holds even a random model to the format."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.backends import SamplingParams
from cai.backends.base import refuse_constraint
from cai.backends.constraints import NumberList, token_kinds
from cai.errors import UserError
from cai.experiments.trait_data import valid_numbers


class _Tok:
    """A toy vocabulary: ids 0-9 are the digits, 10 ",", 11 " ", 12 ", ", 13 "x", 14 EOS."""

    TEXT = [*"0123456789", ",", " ", ", ", "x", ""]

    def __len__(self):
        return len(self.TEXT)

    def decode(self, ids):
        return "".join(self.TEXT[i] for i in ids)


class _Row(list):
    def tolist(self):
        return list(self)

    def __getitem__(self, k):
        got = list.__getitem__(self, k)
        return _Row(got) if isinstance(k, slice) else got


def _walk(nl: NumberList, rng: random.Random, prompt: list[int]) -> str:
    tok = _Tok()
    allowed = nl.allowed_fn(tok, len(prompt), eos_token_id=14)
    ids = list(prompt)
    for _ in range(nl.max_numbers * (nl.max_digits + 2) + 1):
        choice = rng.choice(allowed(0, _Row(ids)))
        if choice == 14:
            break
        ids.append(choice)
    else:
        pytest.fail("the automaton never allowed only EOS within its own token budget")
    return tok.decode(ids[len(prompt) :])


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), max_numbers=st.integers(1, 12), max_digits=st.integers(1, 4))
def test_every_path_is_a_valid_number_list(seed, max_numbers, max_digits):
    nl = NumberList(max_numbers=max_numbers, max_digits=max_digits)
    text = _walk(nl, random.Random(seed), prompt=[13, 13, 11])  # prompt tokens are never part of the state
    assert text and "x" not in text
    parts = text.split(", ")
    assert 1 <= len(parts) <= max_numbers
    assert all(p.isdigit() and 1 <= len(p) <= max_digits for p in parts), text
    if max_digits <= 3:
        assert valid_numbers(text, max_numbers)


def test_a_vocabulary_without_a_space_token_never_strands_the_sampler():
    class NoSpace(_Tok):
        TEXT = [*"0123456789", ",", "x", ", ", "x", ""]  # id 11 is not a space: a bare comma could never be followed

    allowed = NumberList().allowed_fn(NoSpace(), 0, eos_token_id=14)
    assert 10 not in allowed(0, _Row([1])) and 12 in allowed(0, _Row([1]))


def test_a_vocabulary_without_digits_is_a_user_error():
    class Words(_Tok):
        TEXT = ["a"] * 14 + [""]

    with pytest.raises(UserError, match="constrain_format: false"):
        NumberList().allowed_fn(Words(), 0, eos_token_id=14)


def test_state_counts_numbers_and_ends_on_a_foreign_token():
    nl = NumberList()
    assert nl.state(["digit", "digit", ",", " ", "digit"]) == (2, 1, False)
    assert nl.state(["digit", ","]) == (1, 0, True)
    assert nl.state(["digit", "?"])[0] == -1  # EOS, then pads: the row stays ended
    assert nl.allowed_fn(_Tok(), 0, 14)(0, _Row([1, 14, 0])) == [14]


def test_hf_backend_holds_a_random_model_to_the_format(tiny_backend):
    if not {"digit", ","} <= set(token_kinds(tiny_backend.tokenizer).values()):
        pytest.skip("the tiny tokenizer has no single-digit tokens")
    chats = [[{"role": "user", "content": f"Continue: {i}, {i + 1}"}] for i in range(6)]
    nl = NumberList(max_numbers=4)
    free = tiny_backend.generate(chats, SamplingParams(max_new_tokens=21, temperature=1.0, seed=0))
    held = tiny_backend.generate(chats, SamplingParams(max_new_tokens=21, temperature=1.0, seed=0, constraint=nl))
    assert not any(valid_numbers(g.text, 4) for g in free)  # the random model alone never writes the format
    assert all(valid_numbers(g.text, 4) for g in held), [g.text for g in held]


def test_backends_that_cannot_constrain_refuse():
    refuse_constraint("openai:x", SamplingParams())  # no constraint asked: nothing to refuse
    with pytest.raises(UserError, match="cannot constrain decoding"):
        refuse_constraint("openai:x", SamplingParams(constraint=NumberList()))
