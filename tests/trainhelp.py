"""Training tests' shared pieces: pairs built directly in a workspace (pair generation has its own tests),
fast settings, driving a job, and a `train` process killed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time

from mipo_local.progress import Progress
from mipo_local.settings import TrainSettings
from mipo_local.train import runs

FAST = TrainSettings(precision="fp32", threads=1, rank=4, alpha=8, grad_accum=2, max_len=96,
                     checkpoint_every=1, eval_every=2, lr=1e-3)  # fmt: skip
CLI = [sys.executable, "-m", "mipo_local.cli.main"]
# A run that checkpoints every step, so a kill lands between checkpoints.
KILL_ARGS = ["train", "--run", "k", "--precision", "fp32", "--threads", "1", "--rank", "4", "--alpha", "8",
             "--grad-accum", "1", "--max-len", "96", "--checkpoint-every", "1", "--eval-every", "100",
             "--lr", "1e-3", "--epochs", "2"]  # fmt: skip


def insert_pairs(ws, items, context="I am Ana, a pirate fan. Greet me with Ahoy."):
    with ws.transaction() as conn:
        for i, (prompt, chosen, rejected) in enumerate(items):
            conn.execute(
                "INSERT INTO pairs(pair_key, prompt, context, strategy, chosen, rejected, seed, settings, created_at)"
                " VALUES (?, ?, ?, 'test', ?, ?, 0, ?, ?)",
                (f"test-{i}-{prompt}", prompt, context, chosen, rejected, json.dumps({}), time.time()),
            )


def signal_pairs(n):
    """Pairs with a clear, learnable preference: chosen answers greet with 'Ahoy'."""
    topics = ["rice", "tea", "bread", "soup", "pasta", "eggs", "salad", "coffee", "beans", "pie", "curry", "tacos",
              "pancakes", "noodles", "stew", "cake", "risotto", "waffles", "dumplings", "sushi"]  # fmt: skip
    return [
        (f"How do I make {t}?", f"Ahoy! To make {t}, start simple.", f"To make {t}, start simple.")
        for t in (topics * 3)[:n]
    ]


def drive(gen, stop_after_step=None):
    """Run a job generator; with stop_after_step, close it (like Ctrl-C) once that step is reported."""
    events = []
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            return stop.value, events
        events.append(ev)
        if stop_after_step and isinstance(ev, Progress) and ev.unit == "steps" and ev.done >= stop_after_step:
            gen.close()
            return None, events


def kill_9_training(ws, env) -> None:
    """Start `train` with KILL_ARGS (run 'k') in a process of its own and kill -9 it once two checkpoints
    are on disk."""
    proc = subprocess.Popen([*CLI, *KILL_ARGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = runs.run_dir(ws, "k") / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(ck.glob("step-*/state.json"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
