"""Constrained decoding: the tokens a model may sample next, given what it has written so far.

A small model asked for "a comma-separated list of numbers and nothing else" mostly breaks the format (the 135M
default: 1 valid list in 32 at temperature 1; most run past ten numbers or write four-digit ones), so a
subliminal-learning teacher would leave no data after the format filter. Constraining the sampler to the format
keeps the model's own preferences *among* valid continuations — its distribution renormalised over the allowed
tokens — which is exactly the channel a hidden trait would have to travel through.

The HF backend applies a constraint through transformers' ``prefix_allowed_tokens_fn`` (its
``PrefixConstrainedLogitsProcessor``); backends that cannot constrain refuse a request that asks for it instead of
returning unconstrained text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class NumberList:
    """``d, d, d`` — between 1 and ``max_numbers`` numbers of 1 to ``max_digits`` digits, separated by a comma and
    one space, then end of sequence. The list ends only where the model chooses to (EOS after a number) or when
    it has written ``max_numbers`` full numbers."""

    max_numbers: int = 10
    max_digits: int = 3

    def allowed_fn(self, tokenizer, prompt_len: int, eos_token_id: int):
        """A ``prefix_allowed_tokens_fn`` for ``model.generate``: the allowed token ids after a row's tokens (the
        padded prompt is the first ``prompt_len`` of them)."""
        kinds = token_kinds(tokenizer)
        digits = [i for i, k in kinds.items() if k == "digit"]
        space = [i for i, k in kinds.items() if k == " "]
        # a bare comma only where a space token can follow it, so that no state is left with nothing allowed
        comma = [i for i, k in kinds.items() if k == ","] if space else []
        comma_space = [i for i, k in kinds.items() if k == ", "]
        if not digits or not (comma_space or comma):
            from cai.errors import UserError

            raise UserError(
                "this model's tokenizer has no single-digit, comma or space tokens to hold a number list to; set "
                "constrain_format: false in the config"
            )
        eos = [eos_token_id]

        def allowed(batch_id: int, ids) -> list[int]:
            n_numbers, n_digits, after_comma = self.state([kinds.get(int(t), "?") for t in ids[prompt_len:].tolist()])
            if n_numbers < 0:  # the row already ended (EOS, then pads): keep it ended
                return eos
            if after_comma:
                return space
            if n_digits == 0:  # start of a number
                return digits
            more_digits = digits if n_digits < self.max_digits else []
            if n_numbers >= self.max_numbers:
                return more_digits + eos
            return more_digits + comma + comma_space + eos

        return allowed

    def state(self, kinds: Sequence[str]) -> tuple[int, int, bool]:
        """(numbers started, digits of the current number, a comma waits for its space) after tokens of ``kinds``;
        numbers = -1 once the row has ended (any token that is not part of the format, i.e. EOS or padding)."""
        n_numbers, n_digits, after_comma = 0, 0, False
        for k in kinds:
            if k == "digit":
                if n_digits == 0:
                    n_numbers += 1
                n_digits += 1
            elif k == ",":
                after_comma, n_digits = True, 0
            elif k == ", ":
                n_digits = 0
            elif k == " ":
                after_comma = False
            else:
                return -1, 0, False
        return n_numbers, n_digits, after_comma


@lru_cache(maxsize=4)  # one pass over the vocabulary (~50k decodes) per tokenizer, not per batch
def token_kinds(tokenizer) -> dict[int, str]:
    """Token ids whose text is exactly one digit, ``,``, `` `` or ``, `` mapped to that kind ("digit" for digits)."""
    out: dict[int, str] = {}
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if len(text) == 1 and text.isdigit() and text.isascii():
            out[i] = "digit"
        elif text in (",", " ", ", "):
            out[i] = text
    return out


Constraint = NumberList  # the one kind so far; a union once there are more
