"""SamplingParams (vLLM's names and meanings) and the sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.n != 1:
            raise ValueError(f"n must be 1 (one completion per request), got {self.n}")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class Sample:
    token: int
    logprobs: dict[int, Logprob] | None = field(default=None)


def top_logprobs(logp: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
    """The chosen token's logprob and rank, plus the k most likely tokens (vLLM's layout)."""
    chosen = float(logp[token])
    out = {token: Logprob(chosen, int((logp > logp[token]).sum()) + 1)}
    if k > 0:
        vals, ids = logp.topk(k)
        for r, (v, i) in enumerate(zip(vals.tolist(), ids.tolist(), strict=True), start=1):
            out.setdefault(i, Logprob(v, r))
    return out


def sample(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]
) -> list[Sample]:
    """logits [B, V] float32 -> one token per row; greedy rows are an argmax."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, p in enumerate(params):
        row = logits[i]
        if p.greedy:
            tok = greedy[i]
        else:
            x = row / p.temperature
            if p.top_k > 0:
                kth = x.topk(min(p.top_k, x.numel())).values[-1]
                x = x.masked_fill(x < kth, float("-inf"))
            probs = x.softmax(-1)
            if p.top_p < 1:
                sp, si = probs.sort(descending=True)
                drop = sp.cumsum(-1) - sp > p.top_p
                probs = probs.scatter(0, si, sp.masked_fill(drop, 0.0))
            tok = int(torch.multinomial(probs.cpu(), 1, generator=gens[i]))
        lp = None
        if p.logprobs is not None:
            lp = top_logprobs(row.log_softmax(-1), tok, p.logprobs)
        out.append(Sample(tok, lp))
    return out
