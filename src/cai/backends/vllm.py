"""In-process vLLM (``vllm:<path-or-id>``; GPU, ``pip install 'cai-lab[vllm]'``) with automatic prefix caching,
so the few-shot turns shared by critique/revision prompts are computed once per GPU, not once per prompt."""

from __future__ import annotations

from collections.abc import Sequence

from cai.backends.base import Chat, Generation, Prefix, SamplingParams, refuse_constraint, truncate_at_stop
from cai.backends.hf import FALLBACK_TEMPLATE, render_prefix


class VLLMBackend:
    """vLLM's offline ``LLM`` engine behind the Backend protocol. ``vllm`` is imported here, lazily."""

    def __init__(
        self,
        spec: str,
        target: str,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        seed: int = 0,
    ):
        from vllm import LLM

        from cai.models import parse_spec, resolve_local

        inner = parse_spec(target)
        self.spec = spec
        self.llm = LLM(
            model=resolve_local(inner) if inner.in_process else target,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
        )
        self.tokenizer = self.llm.get_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = FALLBACK_TEMPLATE

    def _ids(self, prefix: Prefix) -> list[int]:
        return self.tokenizer(render_prefix(self.tokenizer, prefix), add_special_tokens=False)["input_ids"]

    def generate(self, chats: Sequence[Chat], sampling: SamplingParams, *, progress: bool = False) -> list[Generation]:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        refuse_constraint(self.spec, sampling)
        prompts = [TokensPrompt(prompt_token_ids=self._ids(c)) for c in chats]
        params = [
            VSampling(
                max_tokens=sampling.max_new_tokens,
                temperature=max(sampling.temperature, 0.0),
                top_p=1.0 if sampling.greedy else sampling.top_p,
                stop=list(sampling.stop) or None,
                repetition_penalty=sampling.repetition_penalty,
                seed=None if sampling.seed is None else sampling.seed + i,
            )
            for i in range(len(chats))
        ]
        results = []
        for out in self.llm.generate(prompts, params, use_tqdm=progress):
            o = out.outputs[0]
            text, stopped = truncate_at_stop(o.text, sampling.stop)
            finish = "stop" if stopped or o.finish_reason == "stop" else "length"
            results.append(Generation(text, finish, len(out.prompt_token_ids), len(o.token_ids)))
        return results

    def logprobs(
        self, prefixes: Sequence[Prefix], continuations: Sequence[Sequence[str]], *, truncate: bool = True
    ) -> list[list[float]]:
        """Summed log-probability of each continuation, from vLLM's prompt log-probs (prefix cached). vLLM
        refuses a prompt over its context rather than cutting it, whatever ``truncate`` says."""
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        jobs = []
        for p, conts in zip(prefixes, continuations, strict=True):
            pids = self._ids(p)
            for c in conts:
                cids = self.tokenizer(c, add_special_tokens=False)["input_ids"]
                if not cids:
                    raise ValueError(f"empty continuation {c!r}")
                jobs.append((pids + cids, len(cids)))
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids, _ in jobs],
            VSampling(max_tokens=1, prompt_logprobs=0, temperature=0),
            use_tqdm=False,
        )
        flat = []
        for (ids, n), out in zip(jobs, outs, strict=False):
            lps = out.prompt_logprobs  # position k: {token id: Logprob} for ids[k]; None at position 0
            flat.append(sum(lps[k][ids[k]].logprob for k in range(len(ids) - n, len(ids)) if lps[k] is not None))
        res, k = [], 0
        for conts in continuations:
            res.append(flat[k : k + len(conts)])
            k += len(conts)
        return res

    def close(self) -> None:
        import gc

        import torch

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
