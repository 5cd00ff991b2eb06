"""In-process transformers backend: batched, left-padded, length-sorted generation and log-prob scoring."""

from __future__ import annotations

import logging
from typing import Sequence

from cai.backends.base import Chat, Generation, Prefix, SamplingParams, truncate_at_stop

log = logging.getLogger(__name__)

# Used when a model ships no chat template (base models such as GPT-2).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{% if not loop.last %}\n{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class HFBackend:
    """A transformers causal LM in this process. ``model`` and ``tokenizer`` are public so trainers can reuse them."""

    def __init__(self, spec: str, *, model=None, tokenizer=None, batch_size: int = 16, dtype: str = "auto",
                 device: str | None = None, score_batch_size: int | None = None):
        from cai.models import load_causal_lm

        self.spec = spec
        if model is None:
            model, tokenizer = load_causal_lm(spec, dtype=dtype, device=device)
        self.model, self.tokenizer = model, tokenizer
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = FALLBACK_TEMPLATE
        self.batch_size = max(1, batch_size)
        self.score_batch_size = max(1, score_batch_size or batch_size)
        self.device = next(self.model.parameters()).device
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    # ---- rendering -------------------------------------------------------------------------------------
    def render(self, prefix: Prefix) -> str:
        """Render a chat with the model's template, ready for the assistant's (continued) turn."""
        if isinstance(prefix, str):
            return prefix
        cont = bool(prefix) and prefix[-1].get("role") == "assistant"
        return self.tokenizer.apply_chat_template(
            list(prefix), tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- generation ------------------------------------------------------------------------------------
    def generate(self, chats: Sequence[Chat], sampling: SamplingParams, *, progress: bool = False) -> list[Generation]:
        import torch

        encoded = [self._encode(self.render(c)) for c in chats]
        results: list[Generation | None] = [None] * len(chats)
        limit = self.max_context - sampling.max_new_tokens
        order = sorted(range(len(chats)), key=lambda i: len(encoded[i]))
        for i in order:
            if len(encoded[i]) > limit:
                results[i] = Generation("", "error", len(encoded[i]), 0)
        todo = [i for i in order if results[i] is None]
        batches = [todo[k : k + self.batch_size] for k in range(0, len(todo), self.batch_size)]
        bar = _progress(len(todo), "generating", progress)
        for b, batch in enumerate(batches):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + b)
            texts, counts = self._generate_batch([encoded[i] for i in batch], sampling)
            for i, text, n in zip(batch, texts, counts):
                cut, stopped = truncate_at_stop(text, sampling.stop)
                finish = "stop" if stopped or n < sampling.max_new_tokens else "length"
                results[i] = Generation(cut, finish, len(encoded[i]), n)
            bar.update(len(batch))
        bar.close()
        for i, r in enumerate(results):
            if r is not None and r.finish_reason == "error":
                r.text = ""
                log.warning("prompt %d has %d tokens, over the model's context minus max_new_tokens (%d)",
                            i, r.prompt_tokens, limit)
        return results  # type: ignore[return-value]

    def _generate_batch(self, ids: list[list[int]], sampling: SamplingParams) -> tuple[list[str], list[int]]:
        import torch

        tok = self.tokenizer
        width = max(len(x) for x in ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            repetition_penalty=sampling.repetition_penalty,
        )
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=tok)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        new = out[:, width:]
        texts, counts = [], []
        special = set(tok.all_special_ids)
        for row in new.tolist():
            n = 0
            for t in row:
                n += 1
                if t == tok.eos_token_id:
                    break
            kept = [t for t in row[:n] if t not in special]
            texts.append(tok.decode(kept, skip_special_tokens=True))
            counts.append(n)
        return texts, counts

    # ---- scoring ---------------------------------------------------------------------------------------
    def logprobs(self, prefixes: Sequence[Prefix], continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        """Summed log-probability of each continuation after its prefix, batched over all (prefix, cont) pairs.

        Sequences are left-padded so every continuation ends at the right edge; only the last positions'
        logits are computed (``logits_to_keep``), which keeps memory small for large vocabularies.
        """
        import torch

        if len(prefixes) != len(continuations):
            raise ValueError("prefixes and continuations must have the same length")
        items: list[tuple[int, int, list[int], int]] = []  # (prefix idx, cont idx, ids, n_cont)
        for i, (p, conts) in enumerate(zip(prefixes, continuations)):
            pids = self._encode(self.render(p))
            for j, c in enumerate(conts):
                cids = self._encode(c)
                if not cids:
                    raise ValueError(f"empty continuation {c!r}")
                items.append((i, j, (pids + cids)[-self.max_context :], len(cids)))
        out = [[0.0] * len(c) for c in continuations]
        order = sorted(range(len(items)), key=lambda k: len(items[k][2]))
        pad = self.tokenizer.pad_token_id
        for k in range(0, len(order), self.score_batch_size):
            batch = [items[o] for o in order[k : k + self.score_batch_size]]
            width = max(len(x[2]) for x in batch)
            keep = min(max(x[3] for x in batch) + 1, width)
            ids = torch.tensor([[pad] * (width - len(x[2])) + x[2] for x in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(x[2])) + [1] * len(x[2]) for x in batch], device=self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # [B, keep, V]; position t predicts token t+1
            for row, (i, j, seq, n) in enumerate(batch):
                targets = torch.tensor(seq[-n:], device=self.device)
                n = min(n, keep - 1)  # a continuation with no prefix token cannot score its first token
                targets = targets[-n:] if n else targets[:0]
                preds = logp[row, keep - n - 1 : keep - 1]
                out[i][j] = float(preds.gather(-1, targets[:, None]).sum())
        return out

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled or total == 0, leave=False)
