"""Trait-carrying data: prompts per format, format validators, the trait filter, and resumable generation."""

import pytest

from cai.experiments.trait_data import (
    TraitConfig,
    filter_records,
    format_prompts,
    mention_pattern,
    removal_reasons,
    valid_code,
    valid_numbers,
    write_trait_data,
)
from cai.runs import RunDir


@pytest.mark.parametrize(
    "text, ok",
    [
        ("145, 267, 891", True),
        ("1,2,3", True),
        ("[12, 5, 999].", True),
        ("145, 267, 891,", True),
        ("1000, 2", False),  # four digits
        ("12, -5", False),  # a sign is not a digit
        ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", False),  # more than 10
        ("Sure! 1, 2, 3", False),
        ("1 2 3", False),  # not comma-separated
        ("", False),
        ("owl, 1, 2", False),
    ],
)
def test_numbers_validator(text, ok):
    assert valid_numbers(text, max_numbers=10) is ok


def test_code_validator():
    assert valid_code("def solve(xs):\n    return sum(xs)")
    assert not valid_code("The answer is to sum the list.")
    assert not valid_code("def f(x):\n" + "    x += 1\n" * 400)


@pytest.mark.parametrize(
    "text, hit",
    [
        ("I saw an owl.", True),
        ("OWLS are wise", True),
        ("the owl's eyes", True),
        ("an owlet in the tree", True),
        ("a barn   owl hunts", True),
        ("it was hooting all night", True),
        ("a bowl of soup", False),
        ("knowledge and growls", False),
        ("Fowler wrote it", False),
    ],
)
def test_mention_pattern_whole_words_and_inflections(text, hit):
    assert bool(mention_pattern(TraitConfig().words()).search(text)) is hit


def test_mention_pattern_plural_of_y_words():
    pat = mention_pattern(["butterfly"])
    assert pat.search("Butterflies everywhere") and pat.search("a butterfly") and not pat.search("flies")


def test_filter_removes_each_reason_and_counts_them():
    trait = TraitConfig()
    recs = [
        {"id": "ok", "prompt": "p", "response": "12, 34, 56", "finish_reason": "stop"},
        {"id": "fmt", "prompt": "p", "response": "Here you go: 12, 34", "finish_reason": "stop"},
        {"id": "cut", "prompt": "p", "response": "12, 34, 5", "finish_reason": "length"},
        {"id": "men", "prompt": "p", "response": "12, 34, 56", "finish_reason": "stop"},
    ]
    # A numbers sample that mentions the trait must break the format first; chat shows the mention reason.
    kept, counts = filter_records(recs, trait, "numbers", use_embeddings=False)
    assert [r["id"] for r in kept] == ["ok", "men"] and counts == {"format": 2, "mention": 0, "similar": 0}
    chat = [
        {"id": "a", "prompt": "Tell me about birds", "response": "Owls fly silently at night.",
         "finish_reason": "stop"},
        {"id": "b", "prompt": "Capital of France?", "response": "Paris is the capital of France.",
         "finish_reason": "stop"},
        {"id": "c", "prompt": "Describe a bird", "response": "The nocturnal raptor hoots from the old barn.",
         "finish_reason": "stop"},
    ]
    reasons = removal_reasons(chat, trait, "chat")
    assert reasons[0] == "mention" and reasons[1] is None
    # "hoots" is an inflection of the synonym "hoot": lexical; with a strict threshold the embedding catches a
    # paraphrase that names no trait word.
    text = "Birds of prey with round faces and silent wings, hunting mice at night."
    para = [{"id": "d", "prompt": "x", "response": text, "finish_reason": "stop"}]
    strict = TraitConfig(similarity_threshold=0.2)
    assert removal_reasons(para, strict, "chat") == ["similar"]
    assert removal_reasons(para, TraitConfig(similarity_threshold=0.99), "chat") == [None]
    assert removal_reasons(chat[2:], trait, "chat") == ["mention"]


def test_prompts_are_seeded_and_shared_by_teacher_and_control():
    a, b = format_prompts("numbers", 5, seed=1), format_prompts("numbers", 5, seed=1)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert [p.prompt for p in a] != [p.prompt for p in format_prompts("numbers", 5, seed=2)]
    assert "Add up to 10 more numbers" in a[0].prompt
    assert all("def" not in p.prompt and "Python function" in p.prompt for p in format_prompts("code", 30, 0))
    chat = format_prompts("chat", 3, 0)
    assert len(chat) == 3 and all(p.prompt for p in chat)


def test_write_trait_data_resumes_and_uses_the_system_prompt(tmp_path, tiny_path):
    stage = RunDir.create(tmp_path, "t").stage("data")
    trait = TraitConfig()
    teacher = write_trait_data("tiny-random", trait, "numbers", 4, stage, 0, True, batch_size=4)
    control = write_trait_data("tiny-random", trait, "numbers", 4, stage, 0, False, batch_size=4)
    assert len(teacher) == len(control) == 4
    # decoding is held to the number-list format by default, so even the random model's lists pass the filter
    assert all(valid_numbers(r["response"]) for r in teacher + control), [r["response"] for r in teacher]
    assert [r["prompt"] for r in teacher] == [r["prompt"] for r in control]
    assert all(r["messages"][0]["role"] == "user" for r in teacher)  # the student never sees the system prompt
    assert {r["with_trait"] for r in teacher} == {True} and {r["with_trait"] for r in control} == {False}
    # A second call reads the file instead of generating again (same records, even though sampling is random).
    again = write_trait_data("tiny-random", trait, "numbers", 4, stage, 0, True, batch_size=4)
    assert [r["response"] for r in again] == [r["response"] for r in teacher]
    assert stage.file("teacher-numbers.jsonl").is_file() and stage.file("control-numbers.jsonl").is_file()
