"""In-process transformers backend: batched, left-padded, length-sorted generation and log-prob scoring."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cai.backends.base import (
    Chat,
    ContextLengthError,
    Generation,
    Prefix,
    SamplingParams,
    check_deadline,
    current_deadline,
    truncate_at_stop,
)
from cai.errors import UserError

if TYPE_CHECKING:
    from cai.models import ModelSpec

try:
    from transformers import StoppingCriteria
except ImportError:  # pragma: no cover - transformers is a dependency; keeps this module importable without it
    StoppingCriteria = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 32  # tokens: a shorter common prefix is cheaper to recompute than to copy per batch
# tokens beyond the call's shared prefix that the prompts of one branch (a labelled pair's two orders: the same
# conversation and principle before the options) must share for that stem to be encoded once for all of them
MIN_BRANCH_STEM = 16
LOGIT_BUDGET = 2**25  # floats of logits per scoring forward (128 MB in fp32)

# Loop stopping (SamplingParams.stop_loops): every LOOP_EVERY generated tokens, a row whose last LOOP_NGRAM token
# ids occur LOOP_REPEATS or more times in its answer (of at least LOOP_MIN_TOKENS tokens) is ended as a "loop". A
# token-level, per-step-cheap cousin of cai.evaluation.metrics.is_loop (word 4-grams repeated 4 times).
LOOP_NGRAM = 6
LOOP_REPEATS = 4
LOOP_MIN_TOKENS = 16
LOOP_EVERY = 8

# Used when a model ships no chat template (base models such as GPT-2).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{% if not loop.last %}\n{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class HFBackend:
    """A transformers causal LM in this process. ``model`` and ``tokenizer`` are public so trainers can reuse them."""

    def __init__(
        self,
        spec: str | ModelSpec,
        *,
        model=None,
        tokenizer=None,
        batch_size: int = 16,
        dtype: str = "auto",
        device: str | None = None,
        score_batch_size: int | None = None,
        reuse_prefix: bool = True,
        growing_kv: bool = False,
    ):
        from cai.models import ModelSpec, load_causal_lm

        self.spec = spec.raw if isinstance(spec, ModelSpec) else spec  # the string, as reports and manifests show it
        if model is None:
            model, tokenizer = load_causal_lm(spec, dtype=dtype, device=device)
        self.model, self.tokenizer = model, tokenizer
        # what produced the numbers: eval metrics record it (an int8 model's Linear weights are not parameters)
        self.precision = "int8 (dynamic, Linear layers)" if dtype == "int8" else str(self.model.dtype).split(".")[-1]
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = FALLBACK_TEMPLATE
        self.batch_size = max(1, batch_size)
        self.score_batch_size = max(1, score_batch_size or batch_size)
        self.device = next(self.model.parameters()).device
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.reuse_prefix = reuse_prefix  # encode a prefix shared by a whole generate() call once
        # decode into pre-allocated KV buffers (cai.backends.kv_cache) instead of transformers' concatenating cache.
        # Off by default: the same tokens, but `cai bench` measured no consistent end-to-end gain on the 2-core CPU
        # (+13% at batch 64, -12% at batch 128, one run; docs/performance.md), so it stays opt-in until it wins
        self.growing_kv = growing_kv

    # ---- rendering -------------------------------------------------------------------------------------
    def render(self, prefix: Prefix) -> str:
        """Render a chat with the model's template, ready for the assistant's (continued) turn."""
        return render_prefix(self.tokenizer, prefix)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model reads it (no special tokens added: templates carry their own)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- generation ------------------------------------------------------------------------------------
    def generate(self, chats: Sequence[Chat], sampling: SamplingParams, *, progress: bool = False) -> list[Generation]:
        """Length-sorted batches; a token prefix shared by every prompt (few-shot turns, a system prompt) is
        encoded once and its KV cache copied into every batch."""
        import torch

        if sampling.max_new_tokens >= self.max_context:
            raise UserError(
                f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the context of "
                f"{self.spec!r} ({self.max_context} tokens); ask for fewer new tokens"
            )
        check_deadline("generation")
        encoded = [self.encode(self.render(c)) for c in chats]
        results: list[Generation | None] = [None] * len(chats)
        limit = self.max_context - sampling.max_new_tokens
        order = sorted(range(len(chats)), key=lambda i: len(encoded[i]))
        for i in order:
            if len(encoded[i]) > limit:
                results[i] = Generation("", "error", len(encoded[i]), 0)
        todo = [i for i in order if results[i] is None]
        shared = self._shared_prefix([encoded[i] for i in todo]) if len(todo) > 1 else None
        batches = [todo[k : k + self.batch_size] for k in range(0, len(todo), self.batch_size)]
        bar = _progress(len(todo), "generating", progress)
        own_loop = sampling.stop_loops and sampling.greedy and not sampling.stop and sampling.constraint is None
        for b, batch in enumerate(batches):
            check_deadline("generation")
            if sampling.seed is not None:
                torch.manual_seed((sampling.seed + b) % 2**63)
            ids = [encoded[i] for i in batch]
            texts, counts, reasons = (
                self._decode_greedy(ids, sampling, shared) if own_loop else self._generate_batch(ids, sampling, shared)
            )
            for i, text, n, why in zip(batch, texts, counts, reasons, strict=False):
                cut, stopped = truncate_at_stop(text, sampling.stop)
                finish = "stop" if stopped else why
                results[i] = Generation(cut, finish, len(encoded[i]), n)
            bar.update(len(batch))
        bar.close()
        generations: list[Generation] = []
        for i, r in enumerate(results):
            assert r is not None, "every prompt is either over the context (an error) or generated in a batch"
            generations.append(r)
            if r.finish_reason == "error":
                r.text = ""
                log.warning(
                    "prompt %d has %d tokens, over the model's context minus max_new_tokens (%d)",
                    i,
                    r.prompt_tokens,
                    limit,
                )
        return generations

    def _shared_prefix(self, seqs: list[list[int]]) -> tuple[tuple[int, ...], object] | None:
        """(prefix ids, KV cache) of the token prefix all ``seqs`` share, or None when it is too short to pay.
        Computed per call, never kept: trainers may update the weights between calls."""
        import torch

        n = min(common_prefix_len(seqs), min(len(s) for s in seqs) - 1)  # every row keeps a token to feed
        if not self.reuse_prefix or n < MIN_SHARED_PREFIX:
            return None
        key = tuple(seqs[0][:n])
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([key], device=self.device), use_cache=True, logits_to_keep=1)
        return key, out.past_key_values

    def _decoding_cache(self, copy_of=None):
        """An empty KV cache to decode into, or a copy of a shared prefix's cache (see ``growing_kv``)."""
        import copy

        from transformers import DynamicCache

        from cai.backends.kv_cache import growing_cache

        if self.growing_kv:
            return growing_cache(self.model.config, copy_of=copy_of)
        return copy.deepcopy(copy_of) if copy_of is not None else DynamicCache(config=self.model.config)

    def _padded(self, ids: list[list[int]], shared: tuple[tuple[int, ...], object] | None):
        """(input_ids, attention mask, cache or None, shared-prefix length): rows left-padded; with a shared prefix
        the pads sit between the cached prefix and each row's own tokens, and the cache holds the prefix per row."""
        import torch

        pad = self.tokenizer.pad_token_id
        head = list(shared[0]) if shared else []
        tails = [x[len(head) :] for x in ids]
        width = max(len(x) for x in tails)
        input_ids = torch.tensor([head + [pad] * (width - len(x)) + x for x in tails], device=self.device)
        mask = torch.tensor(
            [[1] * len(head) + [0] * (width - len(x)) + [1] * len(x) for x in tails], device=self.device
        )
        cache: Any = None  # a decoding cache holding the prefix per row, when a prefix is shared
        if shared:
            cache = self._decoding_cache(copy_of=shared[1])
            cache.batch_repeat_interleave(len(ids))
        return input_ids, mask, cache, len(head)

    def _texts(self, rows: list[list[int]]) -> tuple[list[str], list[int]]:
        """Decoded text (special tokens dropped) and token count (up to and including EOS) of generated rows."""
        tok = self.tokenizer
        texts, counts = [], []
        special = set(tok.all_special_ids)
        for row in rows:
            n = 0
            for t in row:
                n += 1
                if t == tok.eos_token_id:
                    break
            kept = [t for t in row[:n] if t not in special]
            texts.append(tok.decode(kept, skip_special_tokens=True))
            counts.append(n)
        return texts, counts

    def _generate_batch(
        self, ids: list[list[int]], sampling: SamplingParams, shared: tuple[tuple[int, ...], object] | None = None
    ) -> tuple[list[str], list[int], list[str]]:
        """One ``model.generate`` call: (texts, token counts, finish reasons). Positions come from the attention
        mask, so left padding (and pads after a shared prefix) keep them exact. With ``stop_loops`` (sampling or
        stop strings; greedy decoding uses ``_decode_greedy``) a stopping criterion ends looping rows."""
        import torch

        tok = self.tokenizer
        input_ids, mask, cache, _ = self._padded(ids, shared)
        pad = tok.pad_token_id
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            repetition_penalty=sampling.repetition_penalty,
        )
        kwargs["past_key_values"] = cache if cache is not None else self._decoding_cache()
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.constraint is not None:
            kwargs["prefix_allowed_tokens_fn"] = sampling.constraint.allowed_fn(
                tok, input_ids.shape[1], tok.eos_token_id
            )
        criteria: list = []
        loops = None
        if sampling.stop_loops:
            loops = _loop_criterion(input_ids.shape[1], tok.eos_token_id)
            criteria.append(loops)
        if sampling.stop:  # not transformers' stop_strings: it builds a vocabulary-wide table per string (seconds)
            criteria.append(_StopOnText(tok, sampling.stop, input_ids.shape[1]))
        at = current_deadline()
        if at is not None:
            criteria.append(_StopAtDeadline(at))
        if criteria:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        check_deadline("generation")  # cut short by the deadline: never returned as if complete
        rows = out[:, input_ids.shape[1] :].tolist()
        looped = loops.stopped_at if loops is not None else {}
        rows = [row[: looped[r]] if r in looped else row for r, row in enumerate(rows)]
        texts, counts = self._texts(rows)
        eos = tok.eos_token_id
        reasons = [
            "loop" if r in looped else "stop" if n < sampling.max_new_tokens or row[n - 1 : n] == [eos] else "length"
            for r, (row, n) in enumerate(zip(rows, counts, strict=False))
        ]
        return texts, counts, reasons

    def _decode_greedy(
        self, ids: list[list[int]], sampling: SamplingParams, shared: tuple[tuple[int, ...], object] | None = None
    ) -> tuple[list[str], list[int], list[str]]:
        """Greedy decoding with loop stopping, in our own loop so that rows that ended (EOS or a loop) leave the
        batch: their KV cache rows are dropped, so they stop costing compute (``model.generate`` keeps feeding
        finished rows pads until the whole batch is done). Same inputs, positions, masks and argmax as
        ``model.generate``, so an answer that neither loops nor ends early is the same text (up to float
        differences between batch shapes, which can flip a near-tie)."""
        import torch

        tok = self.tokenizer
        eos = tok.eos_token_id
        input_ids, mask, cache, n_head = self._padded(ids, shared)
        if cache is None:
            cache = self._decoding_cache()
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        use_mask = not bool((mask == 1).all())  # like generate(): no padding, no mask
        penalty = None
        if sampling.repetition_penalty != 1.0:
            from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

            penalty = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
        rows = list(range(len(ids)))  # original row of each batch row
        out: list[list[int]] = [[] for _ in ids]
        reasons = ["length"] * len(ids)
        seqs = input_ids  # prompt + generated ids of the rows still in the batch (repetition penalty, loop checks)
        width = input_ids.shape[1]
        ended = torch.zeros(len(ids), dtype=torch.bool, device=self.device)  # ended but still in the batch
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids[:, n_head:],
                attention_mask=mask if use_mask else None,
                position_ids=pos[:, n_head:],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            pos = pos[:, -1:]
            for step in range(1, sampling.max_new_tokens + 1):
                check_deadline("generation")  # a guard request past its deadline stops between tokens
                scores = logits.float()
                if penalty is not None:
                    scores = penalty(seqs, scores)
                nxt = scores.argmax(-1)
                seqs = torch.cat([seqs, nxt[:, None]], dim=-1)
                stop = ((nxt == eos) if eos is not None else torch.zeros_like(ended)) & ~ended
                loop = torch.zeros_like(stop)
                if step % LOOP_EVERY == 0:
                    loop = repeated_tail(seqs[:, width:]) & ~ended & ~stop
                for b in (stop | loop).nonzero().flatten().tolist():
                    out[rows[b]] = seqs[b, width:].tolist()
                    reasons[rows[b]] = "stop" if stop[b] else "loop"
                ended = ended | stop | loop
                if step == sampling.max_new_tokens or bool(ended.all()):
                    break
                # drop ended rows now and then (a drop copies the KV cache, like one decoding step does)
                if bool(ended.any()) and (step % LOOP_EVERY == 0 or int(ended.sum()) * 4 >= len(rows)):
                    keep = (~ended).nonzero().flatten()
                    cache.batch_select_indices(keep)
                    rows = [rows[k] for k in keep.tolist()]
                    seqs, mask, pos, nxt, ended = seqs[keep], mask[keep], pos[keep], nxt[keep], ended[keep]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                pos = pos + 1
                logits = self.model(
                    input_ids=nxt[:, None],
                    attention_mask=mask if use_mask else None,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                ).logits[:, -1]
        for b, r in enumerate(rows):
            if not ended[b]:
                out[r] = seqs[b, width:].tolist()
        texts, counts = self._texts(out)
        return texts, counts, reasons

    # ---- scoring ---------------------------------------------------------------------------------------
    def logprobs(
        self, prefixes: Sequence[Prefix], continuations: Sequence[Sequence[str]], *, truncate: bool = True
    ) -> list[list[float]]:
        """Summed log-probability of each continuation after its prefix.

        Each distinct prefix is encoded once (left-padded batches, sorted by length); its last position scores
        every continuation's first token, and longer continuations are fed on top of the prefix's KV cache, so
        k answer options cost one prefix pass instead of k. A prefix too long for the context is cut from the
        left, or with ``truncate=False`` raises :class:`ContextLengthError` (a judge must read all it judges).
        """
        if len(prefixes) != len(continuations):
            raise ValueError("prefixes and continuations must have the same length")
        check_deadline("scoring")
        groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        out = [[0.0] * len(c) for c in continuations]
        for i, (p, conts) in enumerate(zip(prefixes, continuations, strict=False)):
            pids = self.encode(self.render(p))
            for j, c in enumerate(conts):
                cids = self.encode(c)
                if not cids:
                    raise ValueError(f"empty continuation {c!r}")
                if not truncate and len(pids) + len(cids) > self.max_context:
                    raise ContextLengthError(len(pids) + len(cids), self.max_context, "scored text")
                key = pids[-max(1, self.max_context - len(cids)) :] if pids else []
                if not key:  # no prefix token: the first token of the continuation cannot be scored
                    key, cids = cids[:1], cids[1:]
                if cids:
                    groups.setdefault(tuple(key), []).append((i, j, cids))
        keys = sorted(groups, key=len)
        # a token prefix every scored prefix shares (the chat template's system turn, a labeller's instructions) is
        # encoded once and its KV cache copied into every batch, as in generate()
        shared = self._shared_prefix([list(key) for key in keys]) if len(keys) > 1 else None
        # prefixes that share a further stem among themselves (one pair's two orders) are encoded in two passes:
        # each stem once, then every prefix's own tail on a copy of its stem's cache
        branches, single = self._branches(keys, len(shared[0]) if shared else 0)
        for k in range(0, len(single), self.score_batch_size):
            check_deadline("scoring")
            batch = single[k : k + self.score_batch_size]
            for i, j, lp in self._score_group(batch, [groups[key] for key in batch], shared):
                out[i][j] = lp
        # whole branches, at most score_batch_size prefixes a batch (one logit position each)
        for batch, _ in self._logit_batches(branches, lambda branch: len(branch[1]), lambda branch: 1):
            check_deadline("scoring")
            for i, j, lp in self._score_branches(batch, groups, shared):
                out[i][j] = lp
        return out

    def _branches(
        self, keys: list[tuple[int, ...]], n_head: int
    ) -> tuple[list[tuple[tuple[int, ...], list[tuple[int, ...]]]], list[tuple[int, ...]]]:
        """(branches, single keys): keys that share a stem of at least ``MIN_BRANCH_STEM`` tokens beyond the call's
        shared prefix (``n_head`` tokens) are grouped under it, at most ``score_batch_size`` a branch and every key
        keeping a token beyond its stem; the rest are single. No branches without ``reuse_prefix``."""
        if not self.reuse_prefix or len(keys) < 2:
            return [], keys
        groups: list[tuple[int, list[tuple[int, ...]]]] = []  # (stem length, keys), over keys in token order
        for key in sorted(keys):
            if groups:
                n, members = groups[-1]
                stem = min(common_prefix_len([members[0][:n], key]), len(key) - 1)
                if stem >= n_head + MIN_BRANCH_STEM and len(members) < self.score_batch_size:
                    groups[-1] = (stem, [*members, key])
                    continue
            groups.append((len(key) - 1, [key]))
        branches = [(ks[0][:n], ks) for n, ks in groups if len(ks) > 1]
        single = sorted((ks[0] for _, ks in groups if len(ks) == 1), key=len)
        return sorted(branches, key=lambda b: max(len(k) for k in b[1])), single

    def continuation_logprobs(
        self, prefixes: Sequence[Prefix], continuations: Sequence[str], *, truncate: bool = True
    ) -> list[tuple[float, int]]:
        """Summed log-probability and token count of each (long) continuation after its prefix, e.g. a whole
        response after its chat. One forward pass over prefix + continuation per row, batched by length with the
        logits kept under ``LOGIT_BUDGET`` floats: for long continuations this is far cheaper than
        :meth:`logprobs`, which scores them in chunks on top of copies of the prefix's KV cache. Rows that share
        their prefix encode it once (with ``reuse_prefix``), and all the continuations' positions are scored in the
        same pass on copies of its cache. Too long for the context:
        the prefix is cut from the left, then the continuation's tail (the count says how many tokens were
        scored), or with ``truncate=False`` :class:`ContextLengthError`."""
        import torch

        if len(prefixes) != len(continuations):
            raise ValueError("prefixes and continuations must have the same length")
        check_deadline("scoring")
        seqs: list[tuple[list[int], list[int]]] = []
        for p, c in zip(prefixes, continuations, strict=True):
            pids, cids = self.encode(self.render(p)), self.encode(c)
            if not cids:
                raise ValueError(f"empty continuation {c!r}")
            if len(pids) + len(cids) > self.max_context:
                if not truncate:
                    raise ContextLengthError(len(pids) + len(cids), self.max_context, "scored text")
                cids = cids[: self.max_context - 1]
                pids = pids[len(pids) - (self.max_context - len(cids)) :]
            if not pids:  # no prefix token: the first token of the continuation cannot be scored
                pids, cids = cids[:1], cids[1:]
            seqs.append((pids, cids))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
        # rows with the same prefix (the contrast labeller's two responses under one context) share its stem (all
        # but its last token): encoded once, then each row's last prefix token and continuation on a copy of it
        by_stem: dict[tuple[int, ...], list[int]] = {}
        for i, (pids, _) in enumerate(seqs):
            if self.reuse_prefix and len(pids) > MIN_BRANCH_STEM:
                by_stem.setdefault(tuple(pids[:-1]), []).append(i)
        vocab = int(self.model.config.vocab_size)
        stems: list[tuple[tuple[int, ...], list[int]]] = []  # (stem, rows), each fitting one batch and logit budget
        for stem, same in by_stem.items():
            keep = max(len(seqs[i][1]) for i in same) + 1
            fit = max(1, min(self.score_batch_size, LOGIT_BUDGET // (vocab * keep)))
            stems += [(stem, same[k : k + fit]) for k in range(0, len(same), fit) if len(same[k : k + fit]) > 1]
        stemmed = {i for _, same in stems for i in same}
        pad = self.tokenizer.pad_token_id
        whole = sorted((i for i in range(len(seqs)) if i not in stemmed), key=lambda i: sum(map(len, seqs[i])))
        for batch, keep in self._logit_batches(whole, lambda i: 1, lambda i: len(seqs[i][1]) + 1):
            check_deadline("scoring")
            rows = [seqs[i][0] + seqs[i][1] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
                self._gather_continuations(logits, batch, seqs, out)
        stems.sort(key=lambda unit: len(unit[0]) + max(len(seqs[i][1]) for i in unit[1]))
        for batch, keep in self._logit_batches(
            stems, lambda unit: len(unit[1]), lambda unit: max(len(seqs[i][1]) for i in unit[1]) + 1
        ):
            check_deadline("scoring")
            members = [(b, i) for b, (_, rows) in enumerate(batch) for i in rows]
            ids, mask, cache = self._on_stems(
                [list(stem) for stem, _ in batch], None, [(b, seqs[i][0][-1:] + seqs[i][1]) for b, i in members]
            )
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=keep
                ).logits
                self._gather_continuations(logits, [i for _, i in members], seqs, out)
        return out

    def _logit_batches(self, units: list, rows: Callable[[Any], int], keep: Callable[[Any], int]):
        """Yield (units, logit positions to keep): consecutive runs of ``units`` (a row, or a stem with its rows)
        of at most ``score_batch_size`` rows whose logits (rows x widest ``keep`` x vocabulary) stay under
        ``LOGIT_BUDGET`` floats; a unit always goes, alone if it must."""
        vocab = int(self.model.config.vocab_size)
        start = 0
        while start < len(units):
            stop, n, width = start + 1, rows(units[start]), keep(units[start])
            while stop < len(units):
                more, wider = n + rows(units[stop]), max(width, keep(units[stop]))
                if more > self.score_batch_size or more * wider * vocab > LOGIT_BUDGET:
                    break
                stop, n, width = stop + 1, more, wider
            yield units[start:stop], width
            start = stop

    def _gather_continuations(self, logits, rows: list[int], seqs, out) -> None:
        """Write (summed log-prob, token count) of each row's continuation into ``out``: ``logits[b]`` are the last
        positions of row ``rows[b]`` (position j predicts token j + 1), its continuation the last tokens."""
        import torch

        keep = logits.shape[1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        for b, i in enumerate(rows):
            cids = seqs[i][1]
            n = len(cids)
            if n:
                targets = torch.tensor(cids, device=self.device)[:, None]
                out[i] = (float(logp[b, keep - 1 - n : keep - 1].gather(-1, targets).sum()), n)

    def _score_group(
        self,
        prefixes: list[tuple[int, ...]],
        items: list[list[tuple[int, int, list[int]]]],
        shared: tuple[tuple[int, ...], object] | None = None,
    ):
        """Yield (i, j, logprob) for the continuations ``items[b]`` of each prefix ``prefixes[b]``; ``shared``: the
        cached token prefix they all start with (:meth:`_shared_prefix`), fed only once."""
        ids, mask, cache, n_head = self._padded([list(p) for p in prefixes], shared)
        yield from self._score_tails(ids[:, n_head:], mask, cache, items)

    def _score_branches(self, branches, groups, shared):
        """Yield (i, j, logprob) for the continuations of every key of ``branches`` ((stem, keys) from
        :meth:`_branches`): the stems in one pass (on ``shared``'s cache), then each key's tail on its stem's."""
        stems = [list(stem) for stem, _ in branches]
        keys = [(b, key) for b, (_, ks) in enumerate(branches) for key in ks]
        ids, mask, cache = self._on_stems(stems, shared, [(b, list(key[len(stems[b]) :])) for b, key in keys])
        yield from self._score_tails(ids, mask, cache, [groups[key] for _, key in keys])

    def _on_stems(self, stems: list[list[int]], shared, rows: list[tuple[int, list[int]]]):
        """(ids, mask, cache) to feed ``rows`` ((stem index, tail tokens)) on top of their stems: the stems are
        encoded in one pass (on ``shared``'s cache, when given), the cache then holds its stem's row for each row,
        and the tails are left-padded after it (the pads sit between a stem and its tail, as in :meth:`_padded`)."""
        import torch

        ids, mask, cache, n_head = self._padded(stems, shared)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            cache = self.model(
                input_ids=ids[:, n_head:],
                attention_mask=mask,
                position_ids=pos[:, n_head:],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).past_key_values
        sel = torch.tensor([b for b, _ in rows], device=self.device)
        cache.batch_select_indices(sel)  # rows of one stem share its row (selecting copies it per row)
        width = max(len(t) for _, t in rows)
        pad = self.tokenizer.pad_token_id
        tail_ids = torch.tensor([[pad] * (width - len(t)) + t for _, t in rows], device=self.device)
        tail_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for _, t in rows], device=self.device)
        return tail_ids, torch.cat([mask[sel], tail_mask], dim=1), cache

    def _score_tails(self, ids, mask, cache, items):
        """Yield (i, j, logprob): ``ids`` (the rows' last tokens, left-padded) fed on ``cache`` (the rows' earlier
        tokens, or None) under ``mask`` (all of them); row b's last position scores the first token of each
        continuation ``items[b]``, and longer continuations are fed on top (:meth:`_score_rest`)."""
        import torch

        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        rows = [(b, i, j, c) for b, group in enumerate(items) for i, j, c in group]
        longer = [r for r in rows if len(r[3]) > 1]
        with torch.inference_mode():
            res = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=bool(longer) or cache is not None,
                logits_to_keep=1,
            )
            first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # [B, V]
            rest = self._score_rest(res.past_key_values, mask, longer) if longer else {}
        for b, i, j, c in rows:
            yield i, j, float(first[b, c[0]]) + rest.get((i, j), 0.0)

    def _score_rest(self, cache, mask, rows) -> dict[tuple[int, int], float]:
        """Log-prob of tokens 2..n of each continuation, fed on top of its prefix's KV cache in row chunks that
        keep the logits under ``LOGIT_BUDGET`` floats."""
        import copy

        import torch

        pad = self.tokenizer.pad_token_id
        vocab = int(self.model.config.vocab_size)
        rows = sorted(rows, key=lambda r: len(r[3]))
        out: dict[tuple[int, int], float] = {}
        start = 0
        while start < len(rows):
            stop = start + 1
            while stop < len(rows) and (stop - start + 1) * (len(rows[stop][3]) - 1) * vocab <= LOGIT_BUDGET:
                stop += 1
            chunk = rows[start:stop]
            t = max(len(r[3]) - 1 for r in chunk)
            sel = torch.tensor([r[0] for r in chunk], device=self.device)
            part = cache if stop == len(rows) else copy.deepcopy(cache)  # selecting rows mutates the cache
            part.batch_select_indices(sel)
            feed = torch.tensor([r[3][:-1] + [pad] * (t + 1 - len(r[3])) for r in chunk], device=self.device)
            cmask = torch.tensor([[1] * (len(r[3]) - 1) + [0] * (t + 1 - len(r[3])) for r in chunk], device=self.device)
            full = torch.cat([mask[sel], cmask], dim=1)
            pos = mask[sel].sum(-1, keepdim=True) + torch.arange(t, device=self.device)
            logits = self.model(input_ids=feed, attention_mask=full, position_ids=pos, past_key_values=part).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, row in zip(chunk, logp, strict=False):
                targets = torch.tensor(r[3][1:], device=self.device)
                out[(r[1], r[2])] = float(row[: len(targets)].gather(-1, targets[:, None]).sum())
            start = stop
        return out

    def close(self) -> None:
        self.model = None


class _StopOnText(StoppingCriteria):
    """Stop a row once its generated text contains a stop string: decodes only a short tail of each row per
    step, so its cost does not depend on the vocabulary (transformers' ``stop_strings`` pre-computes a table
    over every token for every string, which takes seconds per string)."""

    def __init__(self, tokenizer, stop: Sequence[str], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, [s for s in stop if s], start
        self.window = max((len(s) for s in self.stop), default=1) + 8  # tokens: each decodes to >= 1 character

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = []
        for row in input_ids[:, self.start :].tolist():
            tail = self.tokenizer.decode(row[-self.window :], skip_special_tokens=True)
            done.append(any(s in tail for s in self.stop))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _StopAtDeadline(StoppingCriteria):
    """Stop every row once ``time.monotonic()`` passes ``at`` (the caller then raises DeadlineExceeded)."""

    def __init__(self, at: float):
        self.at = at

    def __call__(self, input_ids, scores, **kwargs):
        import time

        import torch

        return torch.full((input_ids.shape[0],), time.monotonic() >= self.at, dtype=torch.bool, device=input_ids.device)


def render_prefix(tokenizer, prefix: Prefix) -> str:
    """A raw string as is; a chat rendered with the tokenizer's template, ready for the assistant's turn (or
    continuing it, when the last message is the assistant's: prefill)."""
    if isinstance(prefix, str):
        return prefix
    cont = bool(prefix) and prefix[-1].get("role") == "assistant"
    return tokenizer.apply_chat_template(
        list(prefix), tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )


def repeated_tail(gen, *, ngram: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS, min_tokens: int = LOOP_MIN_TOKENS):
    """Bool per row of ``gen`` ([rows, generated ids]): the row's last ``ngram`` ids occur ``repeats`` or more
    times in it (overlaps count), i.e. the answer has become a degenerate repetition. One vectorised pass."""
    import torch

    n_rows, length = gen.shape
    if length < max(min_tokens, ngram + repeats - 1):
        return torch.zeros(n_rows, dtype=torch.bool, device=gen.device)
    win = gen.unfold(1, ngram, 1)  # [rows, windows, ngram]
    return (win == win[:, -1:]).all(-1).sum(-1) >= repeats


def _loop_criterion(width: int, eos: int | None):
    """A transformers StoppingCriteria for ``model.generate``: ends a row whose generated tail (after ``width``
    prompt columns) is a loop (checked every LOOP_EVERY tokens); ``stopped_at`` maps row -> tokens kept."""
    import torch
    from transformers import StoppingCriteria

    class LoopStop(StoppingCriteria):
        def __init__(self) -> None:
            self.stopped_at: dict[int, int] = {}

        def __call__(self, input_ids, scores, **kwargs):
            n = input_ids.shape[1] - width
            hit = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if n % LOOP_EVERY:
                return hit
            gen = input_ids[:, width:]
            ended = (gen == eos).any(-1) if eos is not None else torch.zeros_like(hit)
            hit = repeated_tail(gen) & ~ended
            for r in hit.nonzero().flatten().tolist():
                if r not in self.stopped_at:
                    self.stopped_at[r] = n
            return hit

    return LoopStop()


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``seqs``."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled or total == 0, leave=False)
