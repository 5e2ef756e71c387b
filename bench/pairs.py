"""Batched MIPO generation vs one `create_chat_completion` after another, on the default model.

Both sides answer the same requests (MIPO's positive and negative for each prompt: the user's context, then
an unrelated persona) with the same sampling settings and thread count; the table gives generated tokens
per second and the ratio. It also checks how often a request's answer is the same token for token when it
runs alone instead of inside a batch.

    python bench/pairs.py [--prompts 16] [--max-tokens 96] [--threads 2] [--batch 16]
"""

from __future__ import annotations

import argparse
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


def build_requests(n_prompts: int, max_tokens: int) -> list[tuple[str | None, str]]:
    bank = persona_bank()
    items = []
    for i in range(n_prompts):
        prompt = f"What do you suggest for {TOPICS[i % len(TOPICS)]}?"
        items += [(USER, prompt), (bank[(7 * i) % len(bank)], prompt)]
    return items


def run_sequential(path, items, max_tokens, threads, temperature, top_p):
    llm = load_llama(path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads)
    tokens, start = 0, time.perf_counter()
    for i, (context, prompt) in enumerate(items):
        out = llm.create_chat_completion(
            build_messages(context, prompt),
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            min_p=0.0,
            max_tokens=max_tokens,
            seed=i,
        )
        tokens += out["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - start
    llm.close()
    return tokens, elapsed


def run_batched(path, items, max_tokens, threads, temperature, top_p, batch):
    cf = chat_format(str(path))
    requests = [
        GenRequest(cf.prompt_ids(c, p), max_tokens, temperature, top_p, seed=i, id=i)
        for i, (c, p) in enumerate(items)
    ]
    with Engine(path, n_seq=batch, ctx_per_seq=512, n_threads=threads) as engine:
        start = time.perf_counter()
        results = {r.id: r.tokens for r in engine.generate(requests)}
        elapsed = time.perf_counter() - start
        # The same requests one at a time: does the batch around a request change its answer?
        alone = {}
        for req in requests[: min(8, len(requests))]:
            alone.update({r.id: r.tokens for r in engine.generate([req])})
    same = sum(alone[i] == results[i] for i in alone)
    return sum(len(t) for t in results.values()), elapsed, same, len(alone)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts (each gives a positive and a negative)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()

    path = prepare_default()
    items = build_requests(args.prompts, args.max_tokens)
    common = (args.max_tokens, args.threads, args.temperature, args.top_p)
    seq_tokens, seq_s = run_sequential(path, items, *common)
    bat_tokens, bat_s, same, checked = run_batched(path, items, *common, args.batch)
    seq_rate, bat_rate = seq_tokens / seq_s, bat_tokens / bat_s
    print(f"model: {path.name}, {len(items)} requests, max {args.max_tokens} tokens, {args.threads} threads")
    print("| engine | tokens | seconds | tokens/s |\n|---|---:|---:|---:|")
    print(f"| sequential create_chat_completion | {seq_tokens} | {seq_s:.1f} | {seq_rate:.1f} |")
    print(f"| batched Engine (n_seq={args.batch}) | {bat_tokens} | {bat_s:.1f} | {bat_rate:.1f} |")
    print(f"ratio: {bat_rate / seq_rate:.2f}x")
    print(f"same tokens alone as in the batch: {same}/{checked} requests")


if __name__ == "__main__":
    main()
