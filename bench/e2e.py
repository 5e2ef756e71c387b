"""End to end: `mipo-local run` from an empty workspace on the default model; prints each stage's time.

A fixed profile and 32 prompts (8 written here, 24 synthesized by the model, as a new user would get).
Goal on a 2-core machine: the whole pipeline in 15 minutes or less.

    python bench/e2e.py [--prompts 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

PROFILE = "I am Ana, a vegan chef in Lisbon. I like short, practical answers and I always want a recipe idea."
PROMPTS = [
    "What should I cook tonight?",
    "How do I plan a week of lunches?",
    "What is a good dessert for a dinner party?",
    "How can I eat more protein?",
    "What should I bring to a picnic?",
    "How do I keep herbs fresh?",
    "What is a quick breakfast idea?",
    "How do I make a good soup stock?",
]


def mipo(*args: str, env: dict) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "mipo_local.cli.main", *args], env=env, check=True)
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--keep", default=None, help="workspace directory to use (kept afterwards)")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="mipo-e2e-")
    env = {**os.environ, "MIPO_LOCAL_HOME": root}
    times = {"init": mipo("init", env=env)}
    mipo("context", "add", PROFILE, env=env)
    mipo("prompts", "add", *PROMPTS, env=env)
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "mipo_local.cli.main", "run", "--prompts", str(args.prompts)],
        env=env,
        check=True,
    )
    times["run (all stages)"] = time.monotonic() - start
    # Stage times as the pipeline measured them are in its last line; the total is what the user waits for.
    print("\n| step | seconds |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:.0f} |")
    total = sum(times.values())
    print(f"| **total** | **{total:.0f}** ({total / 60:.1f} min; goal <= 15 min) |")
    print(f"workspace: {root}")


if __name__ == "__main__":
    main()
