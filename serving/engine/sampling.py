"""Pick each row's next token from one step's logits: guides, greedy, temperature, top-p, logprobs.

Every row samples with its own `torch.Generator` (seeded from ``SamplingParams.seed``), so a
seeded request gives the same tokens whichever rows it shares a batch with.
"""

from __future__ import annotations

from typing import Any

from serving.engine.base import Logprob, SamplingParams, TokenLogprobs
from serving.engine.request import Request
from serving.engine.token_bytes import TokenBytes

GREEDY_BELOW = 1e-5
"""Temperatures below this pick greedily, as vLLM's sampler does below the same value.
Dividing logits by a temperature near float32's smallest value overflows them to inf (and
one that rounds to 0 divides by zero), which `torch.multinomial` refuses; long before that,
at 1e-5, logits 1e-4 apart already differ by e^-10 in probability, so sampling there is
greedy in all but near-ties."""


def is_greedy(params: SamplingParams) -> bool:
    """Whether ``params`` picks the likeliest token every step (temperature 0, or below `GREEDY_BELOW`)."""
    return params.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: Any) -> Any:
    """The request's own random generator (None for greedy requests, which draw nothing)."""
    import torch

    if is_greedy(params):
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int; torch takes 64 bits
    return generator


class Sampler:
    """Samples rows' next tokens; spells reported tokens with the tokenizer's bytes."""

    def __init__(self, token_bytes: TokenBytes) -> None:
        self.token_bytes = token_bytes

    def sample(self, logits: Any, rows: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Pick each row's next token; report log-probabilities for the rows that asked.

        Each row's `TokenGuide` masks its logits first and accepts the token picked. The
        reported distribution is the one sampled from: the model's own (log-softmax of its
        logits) at temperature 0, else that of the logits divided by the temperature. Under
        ``top_p`` the values are those of the temperature-scaled distribution *before* the
        nucleus cut (as vLLM and OpenAI report them): tokens outside the nucleus keep their
        probability, so an alternative may be listed that could not have been drawn.
        """
        import torch

        for i, r in enumerate(rows):
            if r.guide is not None:
                r.guide.mask(logits[i])
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        reports: list[TokenLogprobs | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            p = r.params
            if is_greedy(p):
                if p.logprobs is not None:
                    reports[i] = self.report(torch.log_softmax(logits[i], dim=-1), tokens[i], p.logprobs)
                continue
            scaled = logits[i] / p.temperature
            probs = torch.softmax(scaled, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
                outside[0] = False  # a top_p below float32's smallest value rounds to 0 and would keep none
                sorted_probs = sorted_probs.masked_fill(outside, 0.0)
                choice = torch.multinomial(sorted_probs, 1, generator=r.generator)
                tokens[i] = int(order[choice].item())
            else:
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
            if p.logprobs is not None:
                reports[i] = self.report(torch.log_softmax(scaled, dim=-1), tokens[i], p.logprobs)
        for r, token in zip(rows, tokens, strict=True):
            if r.guide is not None:
                r.guide.accept(token)
        return tokens, reports

    def report(self, logprobs: Any, token: int, top: int) -> TokenLogprobs:
        """``token``'s entry of one row's log-probabilities and the ``top`` largest ones."""
        import torch

        spell = self.token_bytes.of

        def entry(token_id: int, value: float) -> Logprob:
            text, raw = spell(token_id)
            return Logprob(token_id=token_id, token=text, bytes=raw, logprob=value)

        best: list[Logprob] = []
        if top:
            values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
            best = [entry(t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return TokenLogprobs(chosen=entry(token, float(logprobs[token].item())), top=best)
