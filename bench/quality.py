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

from mipo_local.pipeline import DEFAULT_ROUNDS

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
    """A looping answer ("Ahoy! Ahoy! Ahoy! ...", one sentence over and over), by the same test `pairs`
    applies to its positives (mipo_local.degenerate). Such an answer can pass a wish's check while being
    useless, so it never counts."""
    from mipo_local.degenerate import loops

    return loops(text)


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

# Two wishes of kinds none of the eight covers (a word to mention, a limit on sentences), fixed before any
# measurement and never tuned for: reported beside the eight, outside their mean.
EXTRA_PROFILES = [
    Profile("mention", "I'm a cat person. Always mention my cat, Miso, somewhere in your answer.",
            lambda a: "miso" in a.lower()),
    Profile("sentences", "I have little time. Answer in at most two sentences.",
            lambda a: 0 < len([s for s in re.split(r"(?<=[.!?])\s+", a.strip()) if re.search(r"\w", s)]) <= 2),
]  # fmt: skip
ALL_PROFILES = PROFILES + EXTRA_PROFILES


def pair_signal(ws, check: Callable[[str], bool], sampler: str | None = None) -> dict[str, float]:
    """The share of a round's chosen / rejected answers that meet the wish (round 1: sampler None)."""
    if sampler is None:
        rows = ws.query("SELECT chosen, rejected FROM pairs WHERE sampler IS NULL")
    else:
        rows = ws.query("SELECT chosen, rejected FROM pairs WHERE sampler = ?", (sampler,))
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
    model_path: str, lora: str | None, context: str, prompts: list[str], decoding: dict, base_gguf: str
) -> list[str]:
    """Each prompt's answer from the model (a GGUF, or the base with a LoRA adapter), sampled the way
    `mipo-local chat` samples (settings.AnswerSettings, overridden by `decoding`), seeded per prompt."""
    import dataclasses

    from mipo_local.chat import chat_format
    from mipo_local.engine import Engine, GenRequest, Penalties
    from mipo_local.settings import AnswerSettings

    a = dataclasses.replace(AnswerSettings(), **decoding)
    cf = chat_format(base_gguf)
    reqs = [
        GenRequest(cf.prompt_ids(context, p), max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                   top_k=a.top_k, penalties=Penalties(a.repeat_penalty, a.repeat_last_n), seed=i, id=i)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    longest = max(len(r.prompt) for r in reqs) + a.max_tokens + 2
    with Engine(model_path, n_seq=16, ctx_per_seq=longest, lora_path=lora) as eng:
        out = {r.id: r.text.strip() for r in eng.generate(reqs)}
    return [out[i] for i in range(len(prompts))]


def answer_relevance(base_gguf: str, context: str, questions: list[str], texts: list[str]) -> float:
    """Mean question-answer PMI per token of `texts` under the base model (mipo_local.relevance)."""
    import numpy as np

    from mipo_local.chat import chat_format
    from mipo_local.engine import Engine
    from mipo_local.relevance import relevance

    cf = chat_format(base_gguf)
    longest = max(len(cf.prompt_ids(context, q)) for q in questions)
    longest += max(len(cf.response_ids(context, questions[0], t)) for t in texts) + 8
    with Engine(base_gguf, n_seq=16, ctx_per_seq=longest) as eng:
        return float(np.mean(relevance(eng, cf, context, questions, texts)))


def positives_probe(variants: list[str], n_prompts: int, profiles: list[Profile]) -> None:
    """The pairs' signal, without training: for each variant of `mipo-local pairs` settings (flags as
    "guidance=1,temperature=0.7,candidates=4,repeat_penalty=1.1"), the chosen positives of the first
    `n_prompts` training prompts of each profile, sampled and chosen exactly as `pairs` does
    (candidates.choose: c' a random persona of the bank, degenerate positives passed over). Prints the
    share that meets each profile's wish, and how many candidates were degenerate."""
    import dataclasses

    import numpy as np

    from mipo_local import candidates
    from mipo_local.chat import chat_format
    from mipo_local.engine import Engine
    from mipo_local.modelsource import prepare_default
    from mipo_local.personas import negative_pool
    from mipo_local.settings import PairSettings

    model = str(prepare_default())
    cf = chat_format(model)
    print(
        "| pairs settings | "
        + " | ".join(p.name for p in profiles)
        + " | mean | degenerate candidates | dropped |"
    )
    print("|---" * (len(profiles) + 4) + "|")
    for variant in variants:
        fields = {f.name: f.type for f in dataclasses.fields(PairSettings)}
        overrides = {}
        for part in filter(None, variant.split(",")):
            key, value = part.split("=")
            kind = fields[key]
            overrides[key] = (
                int(value) if kind in ("int", int) else value if kind in ("str", str) else float(value)
            )
        settings = dataclasses.replace(PairSettings(), **overrides)
        rng = np.random.default_rng(0)
        rates, degenerate, dropped, total = [], 0, 0, 0
        n_seq = min(64, 16 * settings.candidates)
        with Engine(model, n_seq=n_seq, ctx_per_seq=512) as eng:
            for prof in profiles:
                pool = negative_pool(prof.context, [])
                items = []
                for i, q in enumerate(QUESTIONS[:n_prompts]):
                    neg = pool[int(rng.integers(len(pool)))]
                    turn = settings.context_turn
                    neg_ids = cf.prompt_ids(neg, q, context_turn=turn)
                    items.append(candidates.Item(f"{prof.name}-{i}", cf.prompt_ids(prof.context, q, context_turn=turn),
                                                 neg_ids, neg_ids, prof.context, q))  # fmt: skip
                choices = candidates.choose(eng, items, settings)
                kept = [choices[it.key].chosen for it in items]
                rates.append(np.mean([c is not None and prof.check(c.text) for c in kept]))
                degenerate += sum(len(c.degenerate) for c in choices.values())
                dropped += sum(c is None for c in kept)
                total += len(items)
        print(
            f"| `{variant or 'defaults'}` | "
            + " | ".join(f"{r:.2f}" for r in rates)
            + f" | **{np.mean(rates):.2f}** | {degenerate} | {dropped} of {total} |",
            flush=True,
        )


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def print_settings_table(rows: list[dict]) -> None:
    """One line per training setting found in the rows: each profile's held-out adherence, the mean of the
    eight against the prompting baseline, loops, and the mean drift, signed and in size (for settings
    measured on the same pairs)."""
    names = [p.name for p in ALL_PROFILES if any(r["profile"] == p.name for r in rows)]
    head = [
        "setting",
        *names,
        "mean of the 8 (base + prompt -> MIPO)",
        "looping",
        "mean drift",
        "mean \\|drift\\|",
    ]
    print("\n| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")

    def key(r):
        return (
            r.get("pairs_args", ""),
            r.get("train_args", ""),
            r.get("round_args", ""),
            len(r.get("rounds", [1])),
        )

    for setting in dict.fromkeys(map(key, rows)):
        mine = {r["profile"]: r for r in rows if key(r) == setting}
        cells = [f"{mine[n]['mipo']:.2f}" if n in mine else "" for n in names]
        eight = [mine[p.name] for p in PROFILES if p.name in mine]
        if len(eight) == len(PROFILES):
            base, tuned = _mean(eight, "base_prompted"), _mean(eight, "mipo")
            cells += [
                f"{base:.2f} -> **{tuned:.2f}**",
                f"{_mean(eight, 'degenerate_mipo'):.2f}",
                f"{_mean(eight, 'drift_pct'):+.1f}%",
                f"{sum(abs(r['drift_pct']) for r in eight) / len(eight):.1f}%",
            ]
        else:
            cells += ["(not all 8 profiles)", "", "", ""]
        label = " ".join(
            f"{what}: `{v}`"
            for what, v in zip(("pairs", "train", "rounds 2+"), setting[:3], strict=True)
            if v
        )
        print(
            f"| {label or 'defaults'} ({setting[3]} round{'s' if setting[3] > 1 else ''}) | "
            + " | ".join(cells)
            + " |"
        )


def print_table(rows: list[dict], judged: bool) -> None:
    """Per profile: the prompted base, round 1 and the last round (when several), drift, loops,
    relevance, and how often each round's chosen answers carried the wish; the eight's mean, then the
    two profiles outside it."""
    n_rounds = max(len(r.get("rounds", [])) for r in rows) or 1
    rounds_head = " | round 1" if n_rounds > 1 else ""
    head = (
        f"| profile | base + context prompt{rounds_head} | MIPO export + context | gain | drift "
        "| looping answers: base / MIPO | question-answer PMI: base / MIPO | pairs: chosen meet it, by round |"
    )
    print("\n" + head + (" judge win rate |" if judged else ""))
    print("|---" * (head.count("|") - 1 + judged) + "|")

    def line(r: dict) -> str:
        first = r.get("rounds", [{}])[0]
        carry = (
            " / ".join(f"{x.get('pairs_chosen_ok', float('nan')):.2f}" for x in r.get("rounds", []))
            or f"{r['pairs_chosen_ok']:.2f}"
        )
        cells = [
            r["profile"],
            f"{r['base_prompted']:.2f}",
            *([f"{first.get('mipo', float('nan')):.2f}"] if n_rounds > 1 else []),
            f"**{r['mipo']:.2f}**",
            f"{r['mipo'] - r['base_prompted']:+.2f}",
            f"{r['drift_pct']:+.2f}%",
            f"{r.get('degenerate_base', float('nan')):.2f} / {r.get('degenerate_mipo', float('nan')):.2f}",
            f"{r.get('relevance_base', float('nan')):+.2f} / {r.get('relevance_mipo', float('nan')):+.2f}",
            carry,
        ]
        if judged:
            cells.append(f"{r['judge_win_rate']:.2f}")
        return "| " + " | ".join(cells) + " |"

    eight = [r for r in rows if r["profile"] in {p.name for p in PROFILES}]
    for r in eight:
        print(line(r))
    if eight:
        size = sum(abs(r["drift_pct"]) for r in eight) / len(eight)
        lifted = sum(r["mipo"] - r["base_prompted"] >= 0.15 for r in eight)
        firsts = [r["rounds"][0]["mipo"] for r in eight if r.get("rounds")]
        round1 = f" | {sum(firsts) / len(firsts):.2f}" if n_rounds > 1 and firsts else ""
        print(
            f"| **mean of the 8** | **{_mean(eight, 'base_prompted'):.2f}**{round1} | **{_mean(eight, 'mipo'):.2f}** "
            f"| {lifted} of {len(eight)} at +0.15 or more | {_mean(eight, 'drift_pct'):+.2f}% (size {size:.2f}%) "
            f"| {_mean(eight, 'degenerate_base'):.2f} / {_mean(eight, 'degenerate_mipo'):.2f} "
            f"| {_mean(eight, 'relevance_base'):+.2f} / {_mean(eight, 'relevance_mipo'):+.2f} | |"
            + (" |" if judged else "")
        )
    for r in rows:
        if r not in eight:
            print(line(r).replace(f"| {r['profile']} |", f"| {r['profile']} (outside the mean) |", 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=",".join(p.name for p in ALL_PROFILES))
    ap.add_argument("--train-prompts", type=int, default=24, help="the rest of the 48 questions are held out")
    # No extra flags by default: the table measures what `mipo-local run` does (2 pairs a training prompt,
    # 128-token answers, guided positives; 1 epoch at lr 5e-4 with the SFT anchor).
    ap.add_argument("--pairs-args", default="", help="extra flags for `mipo-local pairs`")
    ap.add_argument("--train-args", default="", help="extra flags for `mipo-local train`")
    ap.add_argument(
        "--decoding",
        default="",
        metavar="JSON",
        help="override the held-out answers' decoding (settings.AnswerSettings, as `chat` samples), e.g. "
        "'{\"temperature\": 0.1}'",
    )
    ap.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="self-improvement rounds (as `run --rounds`)"
    )
    ap.add_argument(
        "--round-args", default="", help="extra flags for the `train --from-run` of rounds 2 and up"
    )
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
        action="append",
        default=None,
        metavar="SETTINGS",
        help="only measure how often the chosen positives carry the wish (no training), for pairs settings "
        "such as 'guidance=1,temperature=0.7,candidates=4' (repeat the flag to compare several; '' = defaults)",
    )
    args = ap.parse_args()
    if args.table:  # e.g. profiles run in two processes, one per core: `--table a.json,b.json`
        rows = [r for path in args.table.split(",") for r in json.load(open(path))]
        order = [p.name for p in ALL_PROFILES]
        rows.sort(key=lambda r: order.index(r["profile"]))  # stable: settings keep their file order
        settings = {
            (r.get("pairs_args"), r.get("train_args"), r.get("round_args"), len(r.get("rounds", [1])))
            for r in rows
        }
        if len(settings) > 1:  # several settings: compare them
            return print_settings_table(rows)
        return print_table(rows, judged=all(r.get("judge_win_rate") is not None for r in rows))
    chosen = [p for p in ALL_PROFILES if p.name in args.profiles.split(",")]
    if args.positives is not None:
        return positives_probe(args.positives, args.train_prompts, chosen)
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
    jobs = min(args.jobs, len(chosen), len(os.sched_getaffinity(0)))
    argvs = []
    for j in range(jobs):
        argv = [__file__, "--profiles", ",".join(p.name for p in chosen[j::jobs]),
                "--train-prompts", str(args.train_prompts), "--pairs-args", args.pairs_args,
                "--train-args", args.train_args, "--decoding", args.decoding, "--rounds", str(args.rounds),
                "--round-args", args.round_args]  # fmt: skip
        argv += ["--judge", args.judge] if args.judge else []
        argv += ["--workdir", args.workdir] if args.workdir else []
        argvs.append(argv)
    order = [p.name for p in chosen]
    return sorted(pinned_children(argvs), key=lambda r: order.index(r["profile"]))


def pinned_children(argvs: list[list[str]]) -> list[dict]:
    """Run each benchmark script argv (plus `--json FILE`) in a child process pinned to its own share of the
    cores, all at once; the rows they wrote, in argv order."""
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    for j, argv in enumerate(argvs):
        handle, out = tempfile.mkstemp(suffix=".json")
        os.close(handle)  # the child writes it
        pinned = set(cores[j :: len(argvs)])
        cmd = [sys.executable, *argv, "--json", out]
        procs.append((subprocess.Popen(cmd, preexec_fn=lambda c=pinned: os.sched_setaffinity(0, c)), out))
    rows = []
    for proc, out in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a benchmark job failed (exit {proc.returncode}); its output is above")
        with open(out) as fh:
            rows += json.load(fh)
        os.unlink(out)
    return rows


def measure_profile(prof: Profile, args: argparse.Namespace) -> dict:
    """The real pipeline for one profile in its own workspace, round after round; after each round its
    exported model's held-out adherence, loops, relevance and drift. The row's headline numbers are the
    last round's; `rounds` holds every round's."""
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
    run = run_name(args.train_args)
    seconds: dict[str, int] = {}
    decoding = json.loads(args.decoding) if args.decoding else {}

    def stage(name: str, *cmd: str, env=env, seconds=seconds) -> str:
        t0 = time.monotonic()
        out = mipo(env, *cmd)
        seconds[name] = seconds.get(name, 0) + round(time.monotonic() - t0)
        return out

    if fresh:
        stage("init", "init")
        mipo(env, "context", "add", prof.context)
        mipo(env, "prompts", "add", *train_q)
    ws = Workspace.open(root)
    base = str(base_model(ws).file)
    prompted = answers(base, None, prof.context, held_q, decoding, base)
    measured, previous = [], None
    for k in range(1, args.rounds + 1):
        name = run if k == 1 else f"{run}-r{k}"
        from_run = ["--from-run", previous] if previous else []
        stage("pairs", "pairs", *from_run, *shlex.split(args.pairs_args))  # a no-op when the pairs are there
        export_id = newest_export(ws, name)
        if export_id is None:  # this setting has not been trained (or exported) in this workspace yet
            status = ws.query("SELECT status FROM runs WHERE name = ?", (name,))
            if not status:
                extra = shlex.split(args.round_args) if previous else []
                stage("train", "train", "--run", name, *from_run, *extra, *shlex.split(args.train_args))
            elif status[0]["status"] != "finished":  # a benchmark stopped mid-training: continue it
                stage("train", "train", "--run", name, "--resume")
            stage("export", "export", "--run", name, "--no-verify")
            export_id = newest_export(ws, name)
        path, lora = export_engine_args(ws, latest_export(ws, export_id))
        tuned = answers(str(path), str(lora) if lora else None, prof.context, held_q, decoding, base)
        drift_line = stage("eval", "eval", "--export", str(export_id), "--n", "8", "--no-plot")
        drift = re.search(r"drift\s+([+-]?[\d.]+)%", drift_line)
        sampler = previous
        measured.append({
            "round": k,
            "mipo": adherence(prof.check, tuned),
            "degenerate_mipo": sum(map(degenerate, tuned)) / len(held_q),
            "relevance_mipo": answer_relevance(base, prof.context, held_q, tuned),
            "drift_pct": float(drift.group(1)) if drift else None,
            **pair_signal(ws, prof.check, sampler),
            "answers": tuned,
        })  # fmt: skip
        previous = name
    last = measured[-1]
    judge = None
    if args.judge:
        from pathlib import Path

        from mipo_local.evaluate import judge_answers

        mine, theirs = judge_answers(
            Path(args.judge), [(prof.context, q) for q in held_q], last["answers"], prompted
        )
        judge = sum((a > b) + 0.5 * (a == b) for a, b in zip(mine, theirs, strict=True)) / len(held_q)
    row = {
        "profile": prof.name,
        "train_args": args.train_args,
        "pairs_args": args.pairs_args,
        "round_args": args.round_args,
        "judge_win_rate": judge,
        "base_prompted": adherence(prof.check, prompted),
        "degenerate_base": sum(map(degenerate, prompted)) / len(held_q),
        "relevance_base": answer_relevance(base, prof.context, held_q, prompted),
        **{k: v for k, v in last.items() if k not in ("round", "answers")},
        "rounds": [{k: v for k, v in r.items() if k != "answers"} for r in measured],
        "seconds": seconds,
        "answers": {"mipo": last["answers"], "base_prompted": prompted,
                    **{f"round{r['round']}": r["answers"] for r in measured[:-1]}},
    }  # fmt: skip
    print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
    return row


def run_name(train_args: str) -> str:
    """The run a training setting gets in a profile's workspace, one per setting."""
    return "q-" + hashlib.sha1(train_args.encode()).hexdigest()[:8]


def newest_export(ws, run_name: str) -> int | None:
    sql = "SELECT MAX(e.id) AS id FROM exports e JOIN runs r ON r.id = e.run_id WHERE r.name = ?"
    return ws.query(sql, (run_name,))[0]["id"]


if __name__ == "__main__":
    main()
