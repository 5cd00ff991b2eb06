"""The one protocol every generation backend implements.

Two operations cover the whole toolkit:

- ``generate(chats, sampling)``: one completion per conversation. A conversation whose last message is from
  the assistant is *continued* (prefill), which the prefill-attack experiments need.
- ``logprobs(prefixes, continuations)``: the summed log-probability of each given continuation after its
  prefix. Every model "choice" (labels, classification, judge verdicts) is scored this way, never parsed
  from generated text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from cai.backends.constraints import Constraint

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
Chat = list[Message]
Prefix = str | Chat  # a raw prompt string, or a chat rendered with the model's template


# A mild repetition penalty for chat answers: without it the 135M default falls into loops within ~40 tokens
# at temperature 0.7. Evaluation and data paths that must see the model as it is use 1.0.
CHAT_REPETITION_PENALTY = 1.1


@dataclass(kw_only=True)
class SamplingParams:
    """Sampling settings shared by all backends, keyword-only (a positional 1.1 says nothing to a reader).
    ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    seed: int | None = 0
    repetition_penalty: float = 1.0
    # End a sequence once its tail is a degenerate repetition (finish_reason "loop"). Off by default so training
    # and data-generation paths are unchanged; on for evaluation. The HF backend then also drops finished rows
    # from the batch, so answers that ended (EOS or loop) stop costing compute. Other backends ignore it.
    stop_loops: bool = False
    # Restrict what may be sampled to a format (cai.backends.constraints), e.g. a number list for subliminal-learning
    # data. Only the HF backend can; the others refuse the request rather than return unconstrained text.
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Generation:
    """One completion: its text (stop string removed), why it ended, and token counts."""

    text: str
    finish_reason: str  # "stop" | "length" | "loop" (stop_loops ended a repetition) | "error" (prompt too long)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class Backend(Protocol):
    """A model that can generate and score. Implementations: HFBackend, OpenAIBackend (and vLLM later)."""

    spec: str

    def generate(
        self, chats: Sequence[Chat], sampling: SamplingParams, *, progress: bool = False
    ) -> list[Generation]: ...

    def logprobs(
        self, prefixes: Sequence[Prefix], continuations: Sequence[Sequence[str]], *, truncate: bool = True
    ) -> list[list[float]]:
        """For each prefix i, the log-probability of each string in continuations[i] following it. A prefix too
        long for the model's context is cut from the left, or, with ``truncate=False``, raises
        :class:`ContextLengthError`."""
        ...

    def close(self) -> None: ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; return (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def choice_probs(logps: Sequence[float]) -> list[float]:
    """Normalise log-probabilities over a closed set of answers into probabilities that sum to 1. Non-finite
    inputs (NaN, +inf, all -inf) give NaN entries; callers that act on the result must check for that."""
    m = max(logps)
    exps = [math.exp(lp - m) for lp in logps]
    total = sum(exps)
    return [e / total for e in exps]


class ContextLengthError(ValueError):
    """A prompt does not fit the model's context (raised instead of silently cutting it)."""

    def __init__(self, tokens: int, context: int, what: str = "prompt"):
        super().__init__(f"the {what} has {tokens} tokens, over the model's context of {context}")
        self.tokens, self.context = tokens, context


class DeadlineExceeded(TimeoutError):
    """The work ran past the deadline set with :func:`deadline` and was stopped."""


_DEADLINE: ContextVar[float | None] = ContextVar("cai_deadline", default=None)


@contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Within this block (in this thread), backends stop work once ``time.monotonic()`` passes ``at``: the HF
    backend between tokens and scoring batches, the HTTP backend by bounding its request timeouts. They raise
    :class:`DeadlineExceeded` rather than return cut-short output."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def current_deadline() -> float | None:
    """The ``time.monotonic()`` deadline set by :func:`deadline`, or None."""
    return _DEADLINE.get()


def time_left() -> float | None:
    """Seconds until the current deadline (may be negative), or None without one."""
    at = _DEADLINE.get()
    return None if at is None else at - time.monotonic()


def check_deadline(what: str = "work") -> None:
    """Raise :class:`DeadlineExceeded` when the current deadline has passed."""
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"{what} stopped: past its deadline")


def finite_logprob(x: object) -> bool:
    """A usable log-probability: a real number that is not NaN and not +inf (-inf, probability 0, is usable)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) and x != math.inf


def refuse_constraint(spec: str, sampling: SamplingParams) -> None:
    """For backends that cannot constrain decoding: a request that asks for a format is refused, not answered
    with text the format was never enforced on."""
    if sampling.constraint is not None:
        from cai.errors import UserError

        raise UserError(
            f"{spec!r} cannot constrain decoding to a format ({type(sampling.constraint).__name__}); use a local "
            "HF model for this data, or turn the constraint off in the config"
        )
