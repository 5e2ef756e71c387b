"""Batched MIPO generation vs one `create_chat_completion` after another, on the default model.

Both sides answer the same requests (MIPO's positive and negative for each prompt: the user's context, then
an unrelated persona) with the same sampling settings and thread count; the table gives generated tokens
per second and the ratio, over alternating rounds so that a busy machine slows both sides alike. It also
checks how often a request's answer is the same token for token when it runs alone instead of in a batch.

    python bench/pairs.py [--prompts 16] [--max-tokens 96] [--threads 2] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from mipo_local.chat import build_messages, chat_format
from mipo_local.engine import Engine, GenRequest
from mipo_local.llama_loader import load_llama
from mipo_local.modelsource import prepare_default
from mipo_local.personas import persona_bank

USER = "I am Ana, a vegan chef in Lisbon. I like short, practical answers."
TOPICS = (
    "dinner tonight", "a weekend trip", "saving money", "a birthday gift", "learning a language",
    "a morning routine", "a rainy afternoon", "a job interview", "a picnic", "sleeping better",
    "a small garden", "a new laptop", "a long flight", "a team lunch", "a first date", "a quiet evening",
)  # fmt: skip


def build_requests(n_prompts: int) -> list[tuple[str | None, str]]:
    bank = persona_bank()
    items = []
    for i in range(n_prompts):
        prompt = f"What do you suggest for {TOPICS[i % len(TOPICS)]}?"
        items += [(USER, prompt), (bank[(7 * i) % len(bank)], prompt)]
    return items


def run_sequential(llm, items, max_tokens, temperature, top_p) -> tuple[int, float]:
    """One create_chat_completion after another; returns (generated tokens, seconds)."""
    tokens, start = 0, time.perf_counter()
    for i, (context, prompt) in enumerate(items):
        out = llm.create_chat_completion(
            build_messages(context, prompt),
            temperature=temperature,
            top_p=top_p,
            top_k=0,  # the engine samples from temperature + top_p only; so does the baseline
            min_p=0.0,
            max_tokens=max_tokens,
            seed=i,
        )
        tokens += out["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - start


def run_batched(engine, requests) -> tuple[int, float, dict]:
    """All requests through the batched engine; returns (generated tokens, seconds, answers)."""
    start = time.perf_counter()
    answers = {r.id: r.tokens for r in engine.generate(requests)}
    return sum(len(t) for t in answers.values()), time.perf_counter() - start, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts (each gives a positive and a negative)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median ratio is reported")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()

    path = prepare_default()
    items = build_requests(args.prompts)
    cf = chat_format(str(path))
    requests = [
        GenRequest(cf.prompt_ids(c, p), args.max_tokens, args.temperature, args.top_p, seed=i, id=i)
        for i, (c, p) in enumerate(items)
    ]
    llm = load_llama(path, n_ctx=1024, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads)
    engine = Engine(path, n_seq=args.batch, ctx_per_seq=512, n_threads=args.threads)
    print(f"model: {path.name}, {len(items)} requests, max {args.max_tokens} tokens, {args.threads} threads")
    print("| round | sequential tokens/s | batched tokens/s | ratio |\n|---:|---:|---:|---:|")
    ratios, answers = [], {}
    for r in range(1, args.rounds + 1):
        seq_tokens, seq_s = run_sequential(llm, items, args.max_tokens, args.temperature, args.top_p)
        bat_tokens, bat_s, answers = run_batched(engine, requests)
        ratios.append((bat_tokens / bat_s) / (seq_tokens / seq_s))
        print(f"| {r} | {seq_tokens / seq_s:.1f} | {bat_tokens / bat_s:.1f} | {ratios[-1]:.2f}x |")
    print(f"median ratio: {statistics.median(ratios):.2f}x (goal: 2.5x)")
    # The same requests one at a time: does the batch around a request change its answer?
    alone = {}
    for req in requests[:8]:
        alone.update({r.id: r.tokens for r in engine.generate([req])})
    same = sum(alone[i] == answers[i] for i in alone)
    print(f"answers identical alone and inside the batch: {same}/{len(alone)}")
    engine.close()
    llm.close()


if __name__ == "__main__":
    main()
