"""Personalization benchmark: does MIPO make the default model follow *this* user's wishes better?

Each profile is a context whose wishes a program can check (a greeting, a language, a length limit, a
format...), with training prompts and disjoint held-out prompts. For every profile the real pipeline runs
(`mipo-local` context, prompts, pairs, train, export), then the exported GGUF answers the held-out prompts
through llama.cpp with the profile in the system turn, and so does the base model prompted the same way
(the paper's strongest baseline, "personalized prompting"). The score is the share of answers that satisfy
the profile's check. Drift on neutral text comes from `mipo-local eval`.

    python bench/quality.py [--profiles greet,french,...] [--pairs-args "..."] [--train-args "..."] [--judge J.gguf]

Sampling follows the paper (temperature 0.1, top_p 0.9) unless --temperature says otherwise. Every knob of
pairs/train can be passed through, so one variable at a time can be measured with fixed seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

QUESTIONS = [
    "What should I cook tonight?", "How can I sleep better?", "What is a good way to start running?",
    "How do I save money on groceries?", "What book should I read next?", "How do I learn a new language?",
    "What is a fun weekend activity?", "How do I keep my plants alive?", "How can I focus better at work?",
    "What should I pack for a short trip?", "How do I make good coffee at home?", "How do I stay motivated?",
    "What is a healthy breakfast?", "How do I organize my week?", "What is a good gift for a friend?",
    "How do I start a vegetable garden?", "How can I improve my posture?", "What should I do on a rainy day?",
    "How do I write a good email?", "How can I drink more water?", "What is an easy dessert?",
    "How do I prepare for an interview?", "How can I reduce stress?", "What is a good stretching routine?",
    "How do I clean my kitchen quickly?", "What music should I listen to while working?",
    "How do I plan a picnic?", "How do I make friends in a new city?", "What is a good hobby to start?",
    "How can I cook rice perfectly?", "How do I take better photos with my phone?", "How do I fix a slow laptop?",
    "What should I read about history?", "How do I get better at chess?", "What is a good way to spend a Sunday?",
    "How do I choose a good bike?", "How can I learn to draw?", "What should I bring to a dinner party?",
    "How do I keep my home tidy?", "What is a simple soup recipe?", "How do I start journaling?",
    "How can I be more productive in the morning?", "What is a good board game for a family?",
    "How do I care for a cat?", "What should I wear to a wedding?", "How do I learn to swim as an adult?",
    "What is a good podcast topic to explore?", "How do I make a budget?",
]  # fmt: skip


@dataclass
class Profile:
    name: str
    context: str
    check: Callable[[str], bool]


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def degenerate(text: str) -> bool:
    """A looping answer ("Ahoy! Ahoy! Ahoy! ...", one sentence over and over): under half of its word
    trigrams are distinct. Such an answer can pass a wish's check while being useless, so it never counts."""
    words = re.findall(r"\w+", text.lower())
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    return len(words) >= 12 and len(set(trigrams)) < 0.5 * len(trigrams)


def adherence(check: Callable[[str], bool], answers: list[str]) -> float:
    """The share of answers that meet the wish and are not degenerate."""
    return sum(check(a) and not degenerate(a) for a in answers) / len(answers)


PROFILES = [
    Profile("greet", "My name is Ana. Always start your answer by greeting me by name, like 'Hi Ana!'.",
            lambda a: bool(re.match(r"\W*(hi|hello|hey|dear|good \w+)[, ]+ana\b", a.strip(), re.I))),
    Profile("pirate", "I love pirates. Always begin your answer with 'Ahoy!'.", lambda a: a.strip().lower().startswith("ahoy")),
    Profile("short", "I am very busy. Answer in at most 25 words.", lambda a: 0 < _words(a) <= 25),
    Profile("bullets", "I read on my phone. Always answer as a bulleted list with '-' bullets.",
            lambda a: sum(1 for ln in a.splitlines() if ln.strip().startswith(("-", "*", "•"))) >= 2),
    Profile("french", "Je suis Claire, de Lyon. Réponds toujours en français.",
            lambda a: len(re.findall(r"\b(le|la|les|et|est|pour|vous|des|une|avec|dans)\b", a.lower())) >= 3),
    Profile("emoji", "I love emojis. Always end your answer with an emoji.",
            lambda a: bool(a.strip()) and ord(a.strip()[-1]) > 0x2190),
    Profile("signoff", "I am Tom. Always end your answer with the words 'Cheers, Tom!'.", lambda a: a.strip().lower().endswith("cheers, tom!")),
    Profile("question", "I like to reflect. Always end your answer with a question back to me.", lambda a: a.strip().endswith("?")),
]  # fmt: skip


def pair_signal(ws, check: Callable[[str], bool]) -> dict[str, float]:
    rows = ws.query("SELECT chosen, rejected FROM pairs")
    return {
        "pairs_chosen_ok": sum(check(r["chosen"]) for r in rows) / max(len(rows), 1),
        "pairs_rejected_ok": sum(check(r["rejected"]) for r in rows) / max(len(rows), 1),
    }


def mipo(env: dict, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "mipo_local.cli.main", *args], env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"mipo-local {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def answers(
    model_path: str, lora: str | None, context: str, prompts: list[str], temperature: float, base_gguf: str
) -> list[str]:
    from mipo_local.chat import chat_format
    from mipo_local.engine import Engine, GenRequest

    cf = chat_format(base_gguf)
    reqs = [
        GenRequest(
            cf.prompt_ids(context, p), max_tokens=160, temperature=temperature, top_p=0.9, seed=i, id=i
        )
        for i, p in enumerate(prompts)
    ]
    with Engine(model_path, n_seq=16, ctx_per_seq=512, lora_path=lora) as eng:
        out = {r.id: r.text.strip() for r in eng.generate(reqs)}
    return [out[i] for i in range(len(prompts))]


def positives_probe(
    guidances: list[float], n_prompts: int, max_tokens: int, temperature: float, candidates: int = 1
) -> None:
    """The pairs' signal, without training: the share of sampled positives y+ that satisfy the profile's wish,
    per guidance strength g, sampled as `mipo-local pairs` does (c' a random persona from the bank). With
    `candidates` K > 1, K positives are sampled per prompt and the one with the highest pointwise mutual
    information log p(y|c,x) - log p(y|c',x) under the base is kept, as `mipo-local pairs --candidates K` keeps
    it."""
    import numpy as np

    from mipo_local.chat import chat_format
    from mipo_local.engine import Engine, GenRequest
    from mipo_local.modelsource import prepare_default
    from mipo_local.personas import negative_pool

    model = str(prepare_default())
    cf = chat_format(model)
    print("| guidance g | " + " | ".join(p.name for p in PROFILES) + " | mean |")
    print("|---" * (len(PROFILES) + 2) + "|")
    with Engine(model, n_seq=16, ctx_per_seq=512) as eng:
        for g in guidances:
            rng = np.random.default_rng(0)
            reqs, prompts = [], {}
            seed_of = (
                (lambda i, j: i) if candidates == 1 else (lambda i, j: i * 1000 + j)
            )  # K=1: earlier seeds
            for prof in PROFILES:
                pool = negative_pool(prof.context, [])
                for i, q in enumerate(QUESTIONS[:n_prompts]):
                    neg = pool[int(rng.integers(len(pool)))]
                    prompts[(prof.name, i)] = (cf.prompt_ids(prof.context, q), cf.prompt_ids(neg, q))
                    for j in range(candidates):
                        reqs.append(
                            GenRequest(
                                prompts[(prof.name, i)][0],
                                max_tokens=max_tokens,
                                temperature=temperature,
                                top_p=0.9,
                                seed=seed_of(i, j),
                                id=(prof.name, i, j),
                                guide_prompt=prompts[(prof.name, i)][1],
                                guidance=g,
                            )
                        )
            out = {r.id: r for r in eng.generate(reqs)}
            kept = {key: out[(*key, 0)].text for key in prompts}
            if candidates > 1:  # every candidate scored under (c, x) and (c', x) in one batched pass
                items = [(prompt, out[(*key, j)].tokens) for key in prompts for prompt in prompts[key]
                         for j in range(candidates)]  # fmt: skip
                lp = iter(eng.score_many(items))
                for key in prompts:
                    with_c = [next(lp) for _ in range(candidates)]
                    with_neg = [next(lp) for _ in range(candidates)]
                    best = int(np.argmax([a - b for a, b in zip(with_c, with_neg, strict=True)]))
                    kept[key] = out[(*key, best)].text
            rates = [np.mean([p.check(kept[(p.name, i)]) for i in range(n_prompts)]) for p in PROFILES]
            print(
                f"| {g:g} | " + " | ".join(f"{r:.2f}" for r in rates) + f" | **{np.mean(rates):.2f}** |",
                flush=True,
            )


def print_settings_table(rows: list[dict]) -> None:
    """One line per training setting found in the rows: each profile's held-out adherence, the mean against
    the prompting baseline, and the mean drift, signed and in size (for settings measured on the same pairs)."""
    names = [p.name for p in PROFILES if any(r["profile"] == p.name for r in rows)]
    head = [
        "`mipo-local train` flags",
        *names,
        "mean (base + prompt -> MIPO)",
        "mean drift",
        "mean \\|drift\\|",
    ]
    print("\n| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for setting in dict.fromkeys(r.get("train_args", "") for r in rows):
        mine = {r["profile"]: r for r in rows if r.get("train_args", "") == setting}
        cells = [f"{mine[n]['mipo']:.2f}" if n in mine else "" for n in names]
        if len(mine) == len(names):
            base = sum(r["base_prompted"] for r in mine.values()) / len(mine)
            tuned = sum(r["mipo"] for r in mine.values()) / len(mine)
            drift = sum(r["drift_pct"] for r in mine.values()) / len(mine)
            size = sum(abs(r["drift_pct"]) for r in mine.values()) / len(mine)
            cells += [
                f"{base:.2f} -> **{tuned:.2f}**" + (f" (x{tuned / base:.2f})" if base else ""),
                f"{drift:+.1f}%",
                f"{size:.1f}%",
            ]
        else:
            cells += ["(not all profiles)", "", ""]
        print(f"| `{setting or '(defaults)'}` | " + " | ".join(cells) + " |")


def print_table(rows: list[dict], judged: bool) -> None:
    head = (
        "| profile | base + context prompt | MIPO export + context | drift "
        "| looping answers: base / MIPO | pairs: chosen / rejected meet it |"
    )
    print("\n" + head + (" judge win rate |" if judged else ""))
    print("|---" * (7 if judged else 6) + "|")
    for r in rows:
        cells = [
            r["profile"],
            f"{r['base_prompted']:.2f}",
            f"{r['mipo']:.2f}",
            f"{r['drift_pct']:+.2f}%",
            f"{r.get('degenerate_base', float('nan')):.2f} / {r.get('degenerate_mipo', float('nan')):.2f}",
            f"{r['pairs_chosen_ok']:.2f} / {r['pairs_rejected_ok']:.2f}",
        ]
        if judged:
            cells.append(f"{r['judge_win_rate']:.2f}")
        print("| " + " | ".join(cells) + " |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("base_prompted", "mipo", "drift_pct")}
    size = sum(abs(r["drift_pct"]) for r in rows) / len(rows)
    loops = " / ".join(
        f"{sum(r.get(k, float('nan')) for r in rows) / len(rows):.2f}"
        for k in ("degenerate_base", "degenerate_mipo")
    )
    ratio = f" (x{mean['mipo'] / mean['base_prompted']:.2f})" if mean["base_prompted"] else ""
    print(
        f"| **mean** | **{mean['base_prompted']:.2f}** | **{mean['mipo']:.2f}**{ratio} "
        f"| {mean['drift_pct']:+.2f}% (size {size:.2f}%) | {loops} | |" + (" |" if judged else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=",".join(p.name for p in PROFILES))
    ap.add_argument("--train-prompts", type=int, default=24, help="the rest of the 48 questions are held out")
    # No extra flags by default: the table measures what `mipo-local run` does (2 pairs a training prompt,
    # 128-token answers, guided positives; 1 epoch at lr 5e-4 with the SFT anchor).
    ap.add_argument("--pairs-args", default="", help="extra flags for `mipo-local pairs`")
    ap.add_argument("--train-args", default="", help="extra flags for `mipo-local train`")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--judge", default=None, help="a judge GGUF: also report its win rate, MIPO vs prompting")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="profiles measured at once, each process pinned to its own cores (here 2 jobs on 2 cores: "
        "llama.cpp's and torch's threads slow each other down badly when they share a core)",
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help="keep each profile's workspace in DIR/<profile> and reuse its pairs: several --train-args then "
        "train on the same pairs (each setting gets its own run)",
    )
    ap.add_argument(
        "--table", default=None, metavar="JSON", help="only print the table of earlier --json files"
    )
    ap.add_argument(
        "--positives",
        default=None,
        metavar="G1,G2,...",
        help="only measure how often sampled positives carry the wish, per guidance g (no training)",
    )
    ap.add_argument(
        "--candidates",
        type=int,
        default=1,
        metavar="K",
        help="with --positives: sample K positives a prompt and keep the highest-PMI one, as `pairs` does",
    )
    ap.add_argument(
        "--probe-tokens",
        type=int,
        default=128,
        metavar="N",
        help="with --positives: the answers' token limit (default 128, as `pairs --max-tokens`)",
    )
    args = ap.parse_args()
    if args.table:  # e.g. profiles run in two processes, one per core: `--table a.json,b.json`
        rows = [r for path in args.table.split(",") for r in json.load(open(path))]
        order = [p.name for p in PROFILES]
        rows.sort(key=lambda r: order.index(r["profile"]))  # stable: settings keep their file order
        if len({r.get("train_args") for r in rows}) > 1:  # several settings: compare them
            return print_settings_table(rows)
        return print_table(rows, judged=all(r.get("judge_win_rate") is not None for r in rows))
    if args.positives:
        guidances = [float(g) for g in args.positives.split(",")]
        return positives_probe(
            guidances, args.train_prompts, args.probe_tokens, args.temperature, args.candidates
        )
    chosen = [p for p in PROFILES if p.name in args.profiles.split(",")]
    if args.jobs > 1 and len(chosen) > 1:
        rows = run_in_parallel(chosen, args)
    else:
        rows = [measure_profile(prof, args) for prof in chosen]
    print_table(rows, judged=args.judge is not None)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


def run_in_parallel(chosen: list[Profile], args: argparse.Namespace) -> list[dict]:
    """Split the profiles over `args.jobs` child processes, each pinned to its own share of the cores."""
    cores = sorted(os.sched_getaffinity(0))
    jobs = min(args.jobs, len(chosen), len(cores))
    procs = []
    for j in range(jobs):
        mine = [p.name for p in chosen[j::jobs]]
        handle, out = tempfile.mkstemp(suffix=".json")
        os.close(handle)  # the child writes it
        cmd = [sys.executable, __file__, "--profiles", ",".join(mine), "--json", out,
               "--train-prompts", str(args.train_prompts), "--pairs-args", args.pairs_args,
               "--train-args", args.train_args, "--temperature", str(args.temperature)]  # fmt: skip
        cmd += ["--judge", args.judge] if args.judge else []
        cmd += ["--workdir", args.workdir] if args.workdir else []
        pinned = set(cores[j::jobs])
        procs.append((subprocess.Popen(cmd, preexec_fn=lambda c=pinned: os.sched_setaffinity(0, c)), out))
    rows = []
    for proc, out in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a quality job failed (exit {proc.returncode}); its output is above")
        rows += json.load(open(out))
        os.unlink(out)
    order = [p.name for p in chosen]
    return sorted(rows, key=lambda r: order.index(r["profile"]))


def measure_profile(prof: Profile, args: argparse.Namespace) -> dict:
    """The real pipeline for one profile in its own workspace, then its held-out adherence and drift."""
    from mipo_local.evaluate import export_engine_args, latest_export
    from mipo_local.modelsource import base_model
    from mipo_local.workspace import Workspace

    train_q, held_q = QUESTIONS[: args.train_prompts], QUESTIONS[args.train_prompts :]
    if args.workdir:
        root = os.path.join(args.workdir, prof.name)
        fresh = not os.path.exists(os.path.join(root, "mipo.db"))
    else:
        root, fresh = tempfile.mkdtemp(prefix=f"mipo-quality-{prof.name}-"), True
    env = {**os.environ, "MIPO_LOCAL_HOME": root}
    # One run per training setting, so a kept workspace can hold several side by side.
    run = "q-" + hashlib.sha1(args.train_args.encode()).hexdigest()[:8]
    seconds = {}

    def stage(name: str, *cmd: str, env=env, seconds=seconds) -> str:
        t0 = time.monotonic()
        out = mipo(env, *cmd)
        seconds[name] = round(time.monotonic() - t0)
        return out

    if fresh:
        stage("init", "init")
        mipo(env, "context", "add", prof.context)
        mipo(env, "prompts", "add", *train_q)
    stage("pairs", "pairs", *shlex.split(args.pairs_args))  # a no-op when the kept pairs are complete
    ws = Workspace.open(root)

    def newest_export() -> int | None:
        sql = "SELECT MAX(e.id) AS id FROM exports e JOIN runs r ON r.id = e.run_id WHERE r.name = ?"
        return ws.query(sql, (run,))[0]["id"]

    export_id = newest_export()
    if export_id is None:  # this setting has not been trained (or exported) in this workspace yet
        status = ws.query("SELECT status FROM runs WHERE name = ?", (run,))
        if not status:
            stage("train", "train", "--run", run, *shlex.split(args.train_args))
        elif status[0]["status"] != "finished":  # a benchmark stopped mid-training: continue it
            stage("train", "train", "--run", run, "--resume")
        stage("export", "export", "--run", run, "--no-verify")
        export_id = newest_export()
    base = str(base_model(ws).file)
    path, lora = export_engine_args(ws, latest_export(ws, export_id))
    tuned = answers(str(path), str(lora) if lora else None, prof.context, held_q, args.temperature, base)
    prompted = answers(base, None, prof.context, held_q, args.temperature, base)
    drift_line = stage("eval", "eval", "--export", str(export_id), "--n", "8", "--no-plot")
    drift = re.search(r"drift\s+([+-]?[\d.]+)%", drift_line)
    judge = None
    if args.judge:
        from pathlib import Path

        from mipo_local.evaluate import judge_answers

        mine, theirs = judge_answers(Path(args.judge), [(prof.context, q) for q in held_q], tuned, prompted)
        judge = sum((a > b) + 0.5 * (a == b) for a, b in zip(mine, theirs, strict=True)) / len(held_q)
    row = {
        "profile": prof.name,
        "train_args": args.train_args,
        "pairs_args": args.pairs_args,
        "judge_win_rate": judge,
        "base_prompted": adherence(prof.check, prompted),
        "mipo": adherence(prof.check, tuned),
        "degenerate_base": sum(map(degenerate, prompted)) / len(held_q),
        "degenerate_mipo": sum(map(degenerate, tuned)) / len(held_q),
        "drift_pct": float(drift.group(1)) if drift else None,
        # What the training pairs carried: the share of chosen / rejected answers that meet the wish.
        **pair_signal(ws, prof.check),
        "seconds": seconds,
        "answers": {"mipo": tuned, "base_prompted": prompted},
    }
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
