"""Decoding settings that keep a small model out of loops: repetition penalties vs DRY vs plain sampling.

The default model, prompted with each benchmark profile's context (bench/quality.py), answers held-out
questions under each setting. Reported per setting: the share of looping answers (mipo_local.degenerate),
the share that meets the profile's wish (and does not loop), and how much the answers are about their
own questions (mipo_local.relevance: the question-answer PMI per token, under the base model with no
penalty). Penalty settings run through mipo-local's own sampler (mipo_local.engine, batched); DRY, which
only llama.cpp has (Ollama has none), through llama.cpp's sampler chain, one sequence at a time.

    python bench/decoding.py [--questions 12] [--max-tokens 192] [--variants NAME,NAME]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ALL_PROFILES, QUESTIONS, adherence, degenerate  # noqa: E402

VARIANTS = {
    "T 0.1 plain": {"temperature": 0.1},
    "T 0.1, repeat_penalty 1.1": {"temperature": 0.1, "repeat": 1.1},
    "T 0.1, repeat_penalty 1.2": {"temperature": 0.1, "repeat": 1.2},
    "T 0.3 plain": {"temperature": 0.3},
    "T 0.3, repeat_penalty 1.1": {"temperature": 0.3, "repeat": 1.1},
    "T 0.3, repeat_penalty 1.2": {"temperature": 0.3, "repeat": 1.2},
    "T 0.7 plain": {"temperature": 0.7},
    "T 0.7, repeat_penalty 1.1": {"temperature": 0.7, "repeat": 1.1},
    "T 0.7, repeat_penalty 1.2": {"temperature": 0.7, "repeat": 1.2},
    "T 0.3, repeat_penalty 1.1, presence 0.3": {"temperature": 0.3, "repeat": 1.1, "presence": 0.3},
    "T 0.3, DRY 0.8 (llama.cpp only)": {"temperature": 0.3, "dry": 0.8},
}


def engine_answers(eng, cf, context, questions, args, penalties, temperature) -> list[str]:
    from mipo_local.engine import GenRequest

    reqs = [
        GenRequest(cf.prompt_ids(context, q), max_tokens=args.max_tokens, temperature=temperature,
                   top_p=0.9, top_k=40, seed=i, id=i, penalties=penalties)
        for i, q in enumerate(questions)
    ]  # fmt: skip
    out = {r.id: r.text.strip() for r in eng.generate(reqs)}
    return [out[i] for i in range(len(questions))]


def dry_answers(model_path, cf, context, questions, args, multiplier, temperature) -> list[str]:
    """llama.cpp's own chain: DRY (its defaults: base 1.75, allowed length 2, breakers), top-k 40,
    top-p 0.9, temperature, seeded draw."""
    import llama_cpp

    from mipo_local.llama_loader import load_llama

    llm = load_llama(model_path, n_ctx=1024, n_batch=512)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    breakers = [b"\n", b":", b'"', b"*"]
    arr = (ctypes.c_char_p * len(breakers))(*breakers)
    answers = []
    for i, q in enumerate(questions):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for s in (
            llama_cpp.llama_sampler_init_dry(
                vocab, llm._model.n_ctx_train(), multiplier, 1.75, 2, -1, arr, len(breakers)
            ),
            llama_cpp.llama_sampler_init_top_k(40),
            llama_cpp.llama_sampler_init_top_p(0.9, 1),
            llama_cpp.llama_sampler_init_temp(temperature),
            llama_cpp.llama_sampler_init_dist(i),
        ):
            llama_cpp.llama_sampler_chain_add(chain, s)
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
        pending, out = cf.prompt_ids(context, q), []
        for _ in range(args.max_tokens):
            tokens = (llama_cpp.llama_token * len(pending))(*pending)
            llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(tokens, len(pending)))
            tok = llama_cpp.llama_sampler_sample(chain, llm._ctx.ctx, -1)
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            pending = [tok]
        llama_cpp.llama_sampler_free(chain)
        answers.append(llm.detokenize(out).decode("utf-8", errors="replace").strip())
    llm.close()
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=12, help="held-out questions per profile")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--variants", default="|".join(VARIANTS), help="'|'-separated names of VARIANTS")
    args = ap.parse_args()

    from mipo_local.chat import chat_format
    from mipo_local.engine import Engine, Penalties
    from mipo_local.modelsource import prepare_default
    from mipo_local.relevance import relevance

    model = str(prepare_default())
    cf = chat_format(model)
    held = QUESTIONS[24 : 24 + args.questions]
    print(f"Default model prompted with each of {len(ALL_PROFILES)} profiles, {len(held)} held-out questions, "
          f"top-k 40, top-p 0.9, {args.max_tokens} tokens at most.\n")  # fmt: skip
    print("| decoding | looping answers | meets the wish | question-answer PMI / token | seconds |")
    print("|---|---|---|---|---|")
    with Engine(model, n_seq=16, ctx_per_seq=512) as eng:
        for name in args.variants.split("|"):
            spec = VARIANTS[name]
            t0 = time.monotonic()
            loops, meets, rel = [], [], []
            for prof in ALL_PROFILES:
                t = spec["temperature"]
                if "dry" in spec:
                    answers = dry_answers(model, cf, prof.context, held, args, spec["dry"], t)
                else:
                    penalties = Penalties(repeat=spec.get("repeat", 1.0), presence=spec.get("presence", 0.0))
                    answers = engine_answers(eng, cf, prof.context, held, args, penalties, t)
                loops.append(np.mean([degenerate(a) for a in answers]))
                meets.append(adherence(prof.check, answers))
                rel.append(np.mean(relevance(eng, cf, prof.context, held, answers)))
            print(f"| {name} | {np.mean(loops):.2f} | {np.mean(meets):.2f} | {np.mean(rel):+.3f} "
                  f"| {time.monotonic() - t0:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
