"""Simulated-user benchmark: do K of the user's own choices, added to MIPO's pairs, lift held-out adherence?

For each profile of bench/quality.py the real pipeline makes MIPO's pairs on the training prompts and trains
MIPO alone (`--user-weight 0`). Then the profile's own checker plays the user in the blind A/B, as after a
first run in the app: for each training prompt it sees answers from the base and from the model MIPO alone
made, both under the profile's context and sampled as `chat` samples them, and picks one that meets the wish
over one that does not (a prompt where no answer differs on the wish gives no pick). Each pick is stored as
the app stores it (user_pairs.save_ab_pick). The same workspace then trains MIPO + the first K picks for
each K, each run exported and measured like bench/quality.py: held-out adherence of the exported model,
and neutral-text drift from `mipo-local eval`.

    python bench/user_choices.py [--profiles greet,signoff,question,bullets] [--k 8,16,32] [--train-args "..."]
    python bench/user_choices.py --from-workdir DIR --jobs 2   # on bench/quality.py --workdir DIR's pairs

The user's pairs add training items (and, when few, repeats), so a run with them takes more steps than
MIPO alone; each row reports its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    ALL_PROFILES,
    QUESTIONS,
    adherence,
    answers,
    degenerate,
    mipo,
    newest_export,
    pinned_children,
    run_name,
)

CANDIDATES = 4  # answers the simulated user sees per training prompt from each model
ATTEMPTS = 3  # rounds of samples: a prompt gives at most one pick a round


def simulated_picks(
    prof, prompts: list[str], needed: int, models: list[tuple[str, str | None]], decoding: dict, base: str
) -> list[tuple[str, str, str]]:
    """(prompt, picked, other), as the app's blind A/B collects them: each round of samples shows every
    training prompt's answers from each of `models` ((GGUF, LoRA or None)), and the user picks one that
    meets the wish over one that does not, from the other model when it can (a prompt where no answer
    differs on the wish gives no pick). Picks come round by round, so the first K cover K prompts when the
    first round finds K; a later round asks the same prompts again with new samples."""
    picks: list[tuple[str, str, str]] = []
    for attempt in range(ATTEMPTS):
        shown: dict[str, list[tuple[str, int]]] = {p: [] for p in prompts}
        for m, (model, lora) in enumerate(models):
            asked = [p for p in prompts for _ in range(CANDIDATES)]
            seeded = {**decoding, "temperature": 0.7 + 0.1 * attempt}
            texts = answers(model, lora, prof.context, asked, seeded, base)
            for prompt, text in zip(asked, texts, strict=True):
                if text.strip():
                    shown[prompt].append((text, m))
        for prompt in prompts:
            good = [(t, m) for t, m in shown[prompt] if prof.check(t) and not degenerate(t)]
            bad = [(t, m) for t, m in shown[prompt] if not prof.check(t)]
            if not good or not bad:
                continue
            picked, source = good[0]
            other = next((t for t, m in bad if m != source), bad[0][0])
            if (prompt, picked, other) not in picks:
                picks.append((prompt, picked, other))
        print(f"{prof.name}: {len(picks)} picks after {attempt + 1} round(s) of samples", flush=True)
        if len(picks) >= needed:
            break
    return picks[:needed]


def measure(prof, args) -> list[dict]:
    from mipo_local import user_pairs
    from mipo_local.evaluate import export_engine_args, latest_export
    from mipo_local.modelsource import base_model
    from mipo_local.train import runs
    from mipo_local.workspace import Workspace

    train_q, held_q = QUESTIONS[: args.train_prompts], QUESTIONS[args.train_prompts :]
    root = tempfile.mkdtemp(prefix=f"mipo-user-{prof.name}-")
    env = {**os.environ, "MIPO_LOCAL_HOME": root}
    kept = Path(args.from_workdir) / prof.name if args.from_workdir else None
    copied = kept is not None and (kept / "mipo.db").exists()
    if copied:
        # A copy of bench/quality.py's workspace for this profile: the same prompts and MIPO pairs, and K=0 is
        # the quality table's own run.
        shutil.copytree(kept, root, dirs_exist_ok=True)
    else:
        mipo(env, "init", *(["--model", args.model] if args.model else []))
        mipo(env, "context", "add", prof.context)
        mipo(env, "prompts", "add", *train_q)
    mipo(env, "pairs", *shlex.split(args.pairs_args))  # a no-op when the copied pairs are complete
    ws = Workspace.open(root)
    base = str(base_model(ws).file)
    ks = sorted(int(k) for k in args.k.split(","))
    decoding = {"max_tokens": args.answer_tokens} if args.answer_tokens else {}

    def trained(k: int) -> str:
        """The run trained with the first k picks (k=0: MIPO alone), trained and exported when missing."""
        if k == 0 and copied and newest_export(ws, run_name(args.train_args)) is not None:
            return run_name(args.train_args)  # MIPO alone is the run bench/quality.py measured: reuse it
        name = f"k{k}"
        if newest_export(ws, name) is None:
            mipo(env, "train", "--run", name, *(["--user-weight", "0"] if k == 0 else []),
                 *shlex.split(args.train_args))  # fmt: skip
            mipo(env, "export", "--run", name, "--no-verify")
        return name

    def engine_args(name: str) -> tuple[str, str | None]:
        path, lora = export_engine_args(ws, latest_export(ws, newest_export(ws, name)))
        return str(path), str(lora) if lora else None

    # The user compares the base with the model MIPO alone made, as in the app's blind A/B after a first run.
    alone = trained(0)
    picks = simulated_picks(prof, train_q, max(ks), [(base, None), engine_args(alone)], decoding, base)
    print(f"{prof.name}: the simulated user made {len(picks)} of the {max(ks)} choices asked for", flush=True)
    rows, added = [], 0
    for k in [0, *ks]:
        for prompt, picked, other in picks[added:k]:
            user_pairs.save_ab_pick(ws, prof.context, prompt, picked, other)
        added = max(added, min(k, len(picks)))
        name = alone if k == 0 else trained(k)
        tuned = answers(*engine_args(name), prof.context, held_q, decoding, base)
        export_id = newest_export(ws, name)
        drift = re.search(
            r"drift\s+([+-]?[\d.]+)%", mipo(env, "eval", "--export", str(export_id), "--n", "8", "--no-plot")
        )
        summary = runs.get_run(ws, name).summary
        row = {"profile": prof.name, "k": k, "picks": min(k, len(picks)), "user_pairs": summary.get("user_pairs", 0),
               "steps": summary["steps"], "adherence": adherence(prof.check, tuned),
               "drift_pct": float(drift.group(1)) if drift else None}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def measure_in_parallel(chosen: list, args: argparse.Namespace) -> list[dict]:
    """Split the profiles over `args.jobs` child processes of this script, each pinned to its own cores."""
    jobs = min(args.jobs, len(chosen), len(os.sched_getaffinity(0)))
    argvs = []
    for j in range(jobs):
        argv = [__file__, "--profiles", ",".join(p.name for p in chosen[j::jobs]), "--k", args.k,
                "--train-prompts", str(args.train_prompts), "--pairs-args", args.pairs_args,
                "--train-args", args.train_args]  # fmt: skip
        argv += ["--model", args.model] if args.model else []
        argv += ["--answer-tokens", str(args.answer_tokens)] if args.answer_tokens else []
        argv += ["--from-workdir", args.from_workdir] if args.from_workdir else []
        argvs.append(argv)
    order = [p.name for p in chosen]
    return sorted(pinned_children(argvs), key=lambda r: (order.index(r["profile"]), r["k"]))


def print_curve(rows: list[dict]) -> None:
    ks = sorted({r["k"] for r in rows})
    print("\nheld-out adherence (drift %) by K user choices; K=0 is MIPO alone")
    print("profile".ljust(10) + "".join(f"K={k}".rjust(16) for k in ks))
    for name in dict.fromkeys(r["profile"] for r in rows):
        mine = {r["k"]: r for r in rows if r["profile"] == name}
        cells = [
            f"{mine[k]['adherence']:.2f} ({mine[k]['drift_pct'] or 0:+.1f}%)" if k in mine else "" for k in ks
        ]
        print(name.ljust(10) + "".join(c.rjust(16) for c in cells))
    means = [
        sum(r["adherence"] for r in rows if r["k"] == k) / max(1, sum(r["k"] == k for r in rows)) for k in ks
    ]
    print("mean".ljust(10) + "".join(f"{m:.2f}".rjust(16) for m in means))
    print(
        "lift over MIPO alone: "
        + ", ".join(f"K={k}: {m - means[0]:+.2f}" for k, m in zip(ks[1:], means[1:], strict=True))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The default four are the wishes MIPO alone leaves the most room on (README "What to expect"); emoji is
    # left out because neither model ever shows it, so the user would have nothing to pick.
    ap.add_argument("--profiles", default="greet,signoff,question,bullets")
    ap.add_argument("--k", default="8,16,32", help="numbers of user choices to train with")
    ap.add_argument("--train-prompts", type=int, default=24, help="the rest of the 48 questions are held out")
    ap.add_argument("--pairs-args", default="", help="extra flags for `mipo-local pairs`")
    ap.add_argument("--train-args", default="", help="extra flags for `mipo-local train`")
    ap.add_argument(
        "--model", default=None, help="the base model for `mipo-local init` (default: the embedded one)"
    )
    ap.add_argument(
        "--answer-tokens", type=int, default=None, help="longest answer (default: as `chat`, 512)"
    )
    ap.add_argument(
        "--from-workdir",
        default=None,
        metavar="DIR",
        help="start each profile from a copy of DIR/<profile>, a `bench/quality.py --workdir DIR` workspace "
        "(its prompts and MIPO pairs are reused)",
    )
    ap.add_argument(
        "--jobs", type=int, default=1, help="profiles measured at once, each pinned to its own core"
    )
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    chosen = [p for p in ALL_PROFILES if p.name in args.profiles.split(",")]
    if args.jobs > 1 and len(chosen) > 1:
        rows = measure_in_parallel(chosen, args)
    else:
        rows = [row for prof in chosen for row in measure(prof, args)]
    print_curve(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
