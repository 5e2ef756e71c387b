"""Seconds from a cancel to the stop: a real `pairs` job and a real training job on the default model.

Each job runs as the app runs it (tui/widgets/job_runner.py): a thread consumes the job's generator and,
once the cancel flag is set, closes it between two events, which commits what is finished. The flag is set
`--after` seconds into the job's working phase (sampling for pairs, training for the training job, so that
loading the model, which cannot be interrupted, is not measured); the time printed runs from setting it to
the job's close returning.

    taskset -c 0 python bench/cancel.py [--after 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from mipo_local import modelsource, user_pairs
from mipo_local.pairs import generate_pairs
from mipo_local.progress import Progress
from mipo_local.settings import PairSettings, TrainSettings
from mipo_local.train.loop import train
from mipo_local.workspace import Workspace

CONTEXT = "I am Ana, a vegan chef in Lisbon. I like short, practical answers."
TOPICS = ("dinner tonight", "a weekend trip", "saving money", "a birthday gift", "a picnic", "a long flight",
          "a morning routine", "a rainy afternoon", "a job interview", "sleeping better", "a small garden",
          "a team lunch", "a first date", "a quiet evening", "a new laptop", "learning a language")  # fmt: skip


def cancel_after(job, phase: str, after_s: float) -> dict:
    """Consume `job` in a thread as the app's JobRunner does; set the stop flag `after_s` seconds after
    the first event of `phase`, and time the stop."""
    stop, reached, out = threading.Event(), threading.Event(), {}

    def consume():
        try:
            run()
        finally:
            reached.set()  # a job that ends or fails before its working phase does not leave main waiting

    def run():
        while True:
            if stop.is_set():
                job.close()  # the job commits what it finished, as a cancel in the app does
                out["stopped"] = time.monotonic()
                return
            try:
                event = next(job)
            except StopIteration:
                out["finished"] = time.monotonic()
                return
            if isinstance(event, Progress):
                out["last"] = f"{event.phase}: {event.message}"
                if event.phase == phase:
                    reached.set()

    thread = threading.Thread(target=consume)
    start = time.monotonic()
    thread.start()
    reached.wait()
    if not thread.is_alive():
        thread.join()
        raise SystemExit(f"the job ended before its {phase} phase: {out}")
    out["phase_at"] = time.monotonic() - start
    time.sleep(after_s)
    out["cancel_at"] = time.monotonic()
    stop.set()
    thread.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--after", type=float, default=20.0, help="seconds into the working phase to cancel")
    ap.add_argument("--threads", type=int, default=None, help="training threads (default: torch's)")
    args = ap.parse_args()
    model = modelsource.prepare_default()
    root = Path(tempfile.mkdtemp(prefix="mipo-cancel-"))
    ws = Workspace.open(root / "ws", create=True)
    modelsource.set_base_model(ws, str(model))
    ws.add_context(CONTEXT)
    ws.add_prompts([f"What do you suggest for {t}?" for t in TOPICS])
    rows = []

    pairs = cancel_after(generate_pairs(ws, PairSettings()), "sampling", args.after)
    rows.append(("pairs (sampling, 16 sequences a batch)", pairs, f"{ws.count('pairs')} pairs kept"))

    for i, t in enumerate(TOPICS):  # pairs of the user's own for the training job
        user_pairs.add_user_pair(
            ws, origin="review", context=CONTEXT, prompt=f"What do you suggest for {t}?",
            chosen=f"Ana, for {t}: keep it short, plan one step, and cook something green. " * 3,
            rejected=f"There are many options for {t}. It depends on many factors. " * 3, identity=[i],
        )  # fmt: skip
    settings = TrainSettings(threads=args.threads, epochs=3)
    training = cancel_after(train(ws, settings, run_name="bench"), "training", args.after)
    rows.append(("training (LoRA DPO micro-batches)", training, ""))
    ws.close()

    print("\n| job | working phase reached after | cancelled after | seconds from cancel to stop | kept |")
    print("|---|---|---|---|---|")
    for name, r, kept in rows:
        if "stopped" not in r:
            print(f"| {name} | {r['phase_at']:.1f} s | finished before the cancel | - | {kept} |")
            continue
        print(f"| {name} | {r['phase_at']:.1f} s | {args.after:.0f} s | **{r['stopped'] - r['cancel_at']:.2f}**"
              f" | {kept} |")  # fmt: skip
        print(f"    last event before the stop: {r['last']}")
    print(f"workspace: {root}")


if __name__ == "__main__":
    main()
