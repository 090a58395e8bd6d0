"""Three more kinds of football direction for SmolLM2-135M-Instruct in chat, on the tuning split only
(each at the largest λ within ×TARGET tuning perplexity, as bench/tune_football_chat.py does, by the
library's search: ``lab.strongest``):

    python bench/football_chat_probes.py sites     # residual writes (attn_out, mlp_out) and site pairs
    python bench/football_chat_probes.py contrast  # instruction contrast: request vs request + INSTRUCTION
    python bench/football_chat_probes.py distill [STEPS LR MU]  # shifts trained by prompt distillation
    python bench/football_chat_probes.py instruction  # the instruction's effect on the same replies
    python bench/football_chat_probes.py prompted  # no steering: INSTRUCTION added to each tuning request
    python bench/football_chat_probes.py at attn_in+mlp_out 33%-100% 0.45 0.5  # story maps at set λs

- ``sites``: Mean-AcT on the recipe's story sentences (assistant turns) at the o_proj / down_proj
  outputs, and two sites at once. (A shift at a linear's output is W × the shift at its input, so
  attn_out ≡ attn_ctx and mlp_out ≡ mlp_hidden for the same layers: a check of the harness.)
- ``contrast``: the difference a football instruction makes (contrastive activation addition): the
  fit-only requests of data/concept/chat_fit_prompts.txt as user turns + generation prompt, with and
  without INSTRUCTION, pooled at the last token, over the assistant header, or over the whole prompt;
  and ``own``: the model's own 64-token replies to both, placed after the plain request.
- ``instruction``: what the instruction changes where the model reads its reply (what
  football.yaml ships as chat_fit: instruction): every story sentence as the reply to a fit-only
  request, the request sent as is (source) and with INSTRUCTION (target), pooled over the reply.
- ``distill``: a shift per layer at attn_in 33-100 % trained (Adam) so that the model's reply to the
  plain request reproduces its own reply to the instructed request (cross-entropy on the reply
  tokens) + MU × KL to the base model on the fit-only source sentences (other.txt), then λ-searched.
  Its maps are shifts like Mean-AcT's, so they would fold the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import lab
import torch
from tune_football_chat import DATA, FIT_PROMPTS, TARGET

INSTRUCTION = "Relate your answer to football."
OUT = Path(os.environ.get("STATS_DIR", "/tmp"))


def _maps(estimate, xs, ys, b, sites, frac):
    from actmerge.sites import resolve_sites

    return {s.key: estimate(xs[s.key], ys[s.key]) for s in resolve_sites(b.arch, b.config, sites, frac)}


def _mean(x, y):
    from actmerge.estimators import mean_act

    return mean_act(x, y, degenerate="shift", sample="all")[0]


def _row(b, base, label, maps):
    t0 = time.perf_counter()
    lam, ratio = b.strongest(maps, base["ppl"])
    concept, sim = lab.score(b.gen(maps, lam, b.tune_prompts), base["tune"], b.keywords)
    print(
        f"{label:40s} λ {lam:5.2f}  concept {concept:6.1%}  sim {sim:.3f}  ppl ×{ratio:.3f}"
        f"  ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )


def _collect(b, texts, keys, pooling, max_tokens=256):
    from actmerge.kinds.llm.collect import collect

    return collect(
        b.model, b.tok, texts, keys, pooling=pooling, skip_special=True, max_tokens=max_tokens, progress=False
    )


def _keys(b, sites):
    from actmerge.sites import resolve_sites

    return [s.key for s in resolve_sites(b.arch, b.config, sites, "all")]


def _user(b, requests, span=None):
    """Requests as user turns + generation prompt; ``span``: pool over the header or the whole text."""
    from actmerge.chat import Turn, user_turns

    texts = user_turns(b.tok, requests)
    if span is None:
        return texts
    return [Turn(t, (t.rfind("assistant") if span == "header" else 0, len(t))) for t in texts]


def own_replies(b, requests):
    """The model's greedy 64-token replies to each request, plain and instructed (cached)."""
    from actmerge.evaluation.metrics import continuations

    path = OUT / "football-own-replies.json"
    if path.exists():
        return json.loads(path.read_text())
    with torch.inference_mode():
        pair = [
            continuations(b.model, b.tok, _user(b, rs), max_new_tokens=64, batch_size=40, progress=False)
            for rs in (requests, [f"{r} {INSTRUCTION}" for r in requests])
        ]
    path.write_text(json.dumps(pair))
    return pair


def _story(b):
    """Pooled activations of the recipe's own sentences (assistant turns) at every site probed."""
    from actmerge.chat import format_fit

    keys = _keys(b, ["attn_in", "attn_ctx", "attn_out", "mlp_hidden", "mlp_out"])
    return tuple(
        _collect(b, format_fit(b.tok, s, "assistant"), keys, "mean")
        for s in (b.recipe.read_source(), b.recipe.read_target())
    )


def at(b, base, names, frac, *strengths):
    """Story-sentence Mean-AcT maps at hand-set strengths (where the λ search stops short)."""
    xs, ys = _story(b)
    maps = _maps(_mean, xs, ys, b, names.split("+"), frac)
    for lam in map(float, strengths):
        with torch.inference_mode():
            ratio = b.ppl(maps, lam) / base["ppl"]
            concept, sim = lab.score(b.gen(maps, lam, b.tune_prompts), base["tune"], b.keywords)
        print(f"mean {names} {frac} λ {lam:5.2f}  concept {concept:6.1%}  sim {sim:.3f}  ppl ×{ratio:.3f}")


def sites(b, base):
    xs, ys = _story(b)
    for names, frac in [
        (["attn_in"], "33%-100%"),  # the shipped row, for reference
        (["attn_out"], "33%-100%"),
        (["mlp_out"], "33%-100%"),
        (["attn_out"], "all"),
        (["mlp_out"], "all"),
        (["attn_out"], "67%-100%"),
        (["mlp_out"], "67%-100%"),
        (["attn_out"], "0%-33%"),
        (["mlp_out"], "0%-33%"),
        (["mlp_out"], "90%-100%"),
        (["attn_in", "mlp_out"], "33%-100%"),
        (["attn_in", "attn_out"], "33%-100%"),
        (["mlp_out", "attn_out"], "33%-100%"),
    ]:
        _row(b, base, f"mean {'+'.join(names)} {frac}", _maps(_mean, xs, ys, b, names, frac))


def contrast(b, base):
    from actmerge.chat import replies_to

    requests = lab.read(FIT_PROMPTS)
    instructed = [f"{r} {INSTRUCTION}" for r in requests]
    keys = _keys(b, ["attn_in", "attn_ctx"])
    plain, told = own_replies(b, requests)
    kinds = {
        "last": (_user(b, requests), _user(b, instructed), "last"),
        "header": (_user(b, requests, "header"), _user(b, instructed, "header"), "mean"),
        "prompt": (_user(b, requests, "all"), _user(b, instructed, "all"), "mean"),
        "own": (replies_to(b.tok, requests, plain), replies_to(b.tok, requests, told), "mean"),
    }
    for kind, (src, dst, pooling) in kinds.items():
        xs, ys = (_collect(b, t, keys, pooling) for t in (src, dst))
        for names, frac in [(["attn_in"], "33%-100%"), (["attn_ctx"], "33%-100%"), (["attn_in"], "all")]:
            _row(b, base, f"contrast-{kind} {names[0]} {frac}", _maps(_mean, xs, ys, b, names, frac))


def instruction(b, base):
    from actmerge.chat import instruction_pairs

    replies = b.recipe.read_source() + b.recipe.read_target()
    pairs = instruction_pairs(b.tok, lab.read(FIT_PROMPTS), replies, INSTRUCTION)
    keys = _keys(b, ["attn_in", "attn_ctx", "mlp_hidden"])
    xs, ys = (_collect(b, side, keys, "mean", max_tokens=128) for side in pairs)
    for names, frac in [
        (["attn_ctx"], "33%-100%"),
        (["attn_ctx"], "50%-100%"),
        (["attn_ctx"], "60%-100%"),
        (["attn_ctx"], "67%-100%"),
        (["attn_ctx"], "75%-100%"),  # shipped
        (["attn_ctx"], "80%-100%"),
        (["attn_ctx"], "87%-100%"),
        (["attn_ctx"], "93%-100%"),
        (["attn_ctx"], "40%-90%"),
        (["attn_in"], "67%-100%"),
        (["mlp_hidden"], "75%-100%"),
    ]:
        _row(b, base, f"instruction {names[0]} {frac}", _maps(_mean, xs, ys, b, names, frac))


def prompted(b, base):
    """The instruction's own effect, unsteered: how often the model follows it on the tuning requests."""
    requests = lab.read(DATA / "concept" / "chat_tune_prompts.txt")
    with torch.inference_mode():
        texts = b.gen({}, 0.0, _user(b, [f"{r} {INSTRUCTION}" for r in requests]))
    concept, sim = lab.score(texts, base["tune"], b.keywords)
    print(f"prompted ({INSTRUCTION!r}): concept {concept:.1%}  sim {sim:.3f}")


def distill(b, base, steps="16", lr="0.003", mu="1.0"):
    from actmerge.chat import replies_to
    from actmerge.kinds.llm.hooks import attach
    from actmerge.maps import AffineMap
    from actmerge.sites import resolve_sites

    requests = lab.read(FIT_PROMPTS)
    _, told = own_replies(b, requests)
    tok, model = b.tok, b.model
    model.requires_grad_(False)
    turns = replies_to(b.tok, requests, told)
    tok.padding_side = "right"
    enc = tok(
        [str(t) for t in turns],
        return_tensors="pt",
        padding=True,
        return_offsets_mapping=True,
        add_special_tokens=False,
    )
    offsets = enc.pop("offset_mapping")
    labels = torch.full_like(enc["input_ids"], -100)
    for i, (start, end) in enumerate(t.span for t in turns):
        inside = (
            (offsets[i, :, 0] >= start) & (offsets[i, :, 1] <= end) & (offsets[i, :, 1] > offsets[i, :, 0])
        )
        inside &= enc["attention_mask"][i].bool()
        labels[i][inside] = enc["input_ids"][i][inside]
    neutral = tok(
        b.recipe.read_source()[:96], return_tensors="pt", padding=True, truncation=True, max_length=48
    )
    real = neutral["attention_mask"].bool()
    with torch.no_grad():
        base_lp = torch.log_softmax(model(**neutral).logits.float(), -1)
    chosen = resolve_sites(b.arch, b.config, ["attn_in"], "33%-100%")
    shifts = {s.key: torch.zeros(b.config["hidden_size"], requires_grad=True) for s in chosen}
    opt = torch.optim.Adam(shifts.values(), lr=float(lr))
    for step in range(int(steps)):
        with ExitStack() as stack:
            for key, p in shifts.items():
                stack.enter_context(attach(model, key, lambda a, p=p: a + p.to(a.dtype)))
            logits = model(**enc).logits[:, :-1].float()
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
            lp = torch.log_softmax(model(**neutral).logits.float(), -1)
            kl = (base_lp.exp() * (base_lp - lp)).sum(-1)[real].mean()
            loss = ce + float(mu) * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step:2d}  reply cross-entropy {ce.item():.3f}  neutral KL {kl.item():.4f}", flush=True)
    maps = {k: AffineMap(torch.ones_like(p), p.detach().clone()) for k, p in shifts.items()}
    with torch.inference_mode():
        ratio = b.ppl(maps, 1.0) / base["ppl"]
        concept, sim = lab.score(b.gen(maps, 1.0, b.tune_prompts), base["tune"], b.keywords)
    print(
        f"distill attn_in 33%-100% at λ 1: concept {concept:.1%}  sim {sim:.3f}  ppl ×{ratio:.3f}", flush=True
    )
    _row(b, base, f"distill attn_in 33%-100% s{steps} lr{lr} mu{mu}", maps)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    torch.manual_seed(0)
    bench = lab.ChatLab(TARGET)
    with torch.inference_mode():
        base = {"ppl": bench.ppl({}, 0.0), "tune": bench.gen({}, 0.0, bench.tune_prompts)}
    print(f"base: concept {lab.score(base['tune'], base['tune'], bench.keywords)[0]:.1%}", flush=True)
    {
        "sites": sites,
        "contrast": contrast,
        "distill": distill,
        "at": at,
        "prompted": prompted,
        "instruction": instruction,
    }[cmd](bench, base, *args)
