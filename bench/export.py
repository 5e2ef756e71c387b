"""Export time and file sizes on the default model: merged Q8_0 (merge + F16 write + quantize + verify)
and the GGUF LoRA adapter, each as a fresh `mipo-local export` process (what a user waits for).

Goals on the 2-core reference machine: merged Q8_0 <= 20 s, adapter <= 2 s. Without --run, a finished run
is built in a temporary workspace with a seeded random LoRA at rank 8 on all targets (q,k,v,o,gate,up,down)
and its held-out log-probs scored in llama.cpp, as training would leave them.

    python bench/export.py [--pairs 16] [--threads 2] [--quant q8_0] [--workspace DIR --run NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mipo_local import fidelity, modelsource  # noqa: E402
from mipo_local.workspace import Workspace  # noqa: E402

CONTEXT = "I am Ana, a vegan chef in Lisbon. I like short, practical answers."
DISHES = ("lentil soup", "chickpea curry", "mushroom risotto", "black bean tacos", "tofu stir-fry", "pea pasta",
          "bean stew", "veggie paella")  # fmt: skip


def _answer(dish: str, style: str, n: int) -> str:
    steps = [
        f"Step {i + 1}: {style} the {dish} ingredients, taste, and adjust the seasoning." for i in range(n)
    ]
    return f"Here is a {style} way to make {dish}. " + " ".join(steps)


def insert_pairs(ws: Workspace, n: int) -> None:
    """Pairs shaped like real ones: answers of about 100-150 tokens."""
    with ws.transaction() as conn:
        for i in range(n):
            dish = DISHES[i % len(DISHES)]
            conn.execute(
                "INSERT INTO pairs(pair_key, prompt, context, strategy, chosen, rejected, seed, settings, created_at)"
                " VALUES (?, ?, ?, 'bench', ?, ?, 0, '{}', ?)",
                (f"bench-{i}", f"How do I make {dish} for {2 + i} people?", CONTEXT,
                 _answer(dish, "quick vegan", 8 + i % 3), _answer(dish, "classic", 7 + i % 4), time.time()),
            )  # fmt: skip


def build_workspace(root: Path, pairs: int, std: float) -> str:
    from tests.exporthelp import make_finished_run

    ws = Workspace.open(root, create=True)
    modelsource.set_base_model(ws, "default")
    ws.add_context(CONTEXT)
    insert_pairs(ws, pairs)
    make_finished_run(ws, "bench", rank=8, alpha=16.0, std=std)
    ws.close()
    return "bench"


def run_export(ws_dir: Path, run: str, *args: str) -> tuple[float, float, dict]:
    """(process wall seconds, process CPU seconds, the exports row) of one `mipo-local export`."""
    cmd = [
        sys.executable,
        "-m",
        "mipo_local.cli.main",
        "-w",
        str(ws_dir),
        "export",
        "--run",
        run,
        "--force",
        *args,
    ]
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        sys.exit(f"export failed: {done.stderr.strip()}")
    ws = Workspace.open(ws_dir)
    row = ws.query("SELECT * FROM exports ORDER BY id DESC LIMIT 1")[0]
    ws.close()
    return wall, cpu, {"path": row["path"], "size": row["size"], **json.loads(row["info"])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=16, help="held-out pairs (answers of ~100-150 tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument(
        "--lora-std",
        type=float,
        default=0.04,
        help="std of the random LoRA factors (0.04 gives held-out margins of about 0.3-3 nats)",
    )
    parser.add_argument("--workspace", help="an existing workspace with a trained run (with --run)")
    parser.add_argument("--run", help="the trained run to export")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mipo-bench-export-"))
    if args.workspace:
        ws_dir, run = Path(args.workspace), args.run
    else:
        ws_dir = tmp / "ws"
        t0 = time.perf_counter()
        run = build_workspace(ws_dir, args.pairs, args.lora_std)
        print(
            f"built a random rank-8 run with {args.pairs} held-out pairs in {time.perf_counter() - t0:.1f} s"
        )

    threads = ["--threads", str(args.threads)]
    out = tmp / "out"
    load_before = os.getloadavg()[0]
    rows = [
        (f"merged {args.quant.upper()}", *run_export(ws_dir, run, "--quant", args.quant, "--out", str(out / "m"), *threads)),
        ("adapter", *run_export(ws_dir, run, "--adapter-only", "--no-verify", "--out", str(out / "a"), *threads)),
        ("adapter + verify", *run_export(ws_dir, run, "--adapter-only", "--out", str(out / "av"), *threads)),
    ]  # fmt: skip

    print(f"\nmipo-local export, default model (SmolLM2-135M-Instruct), {os.cpu_count()} CPUs, --threads "
          f"{args.threads}, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(f"{'export':18} {'wall s':>6} {'CPU s':>6} {'merge+F16':>9} {'quantize':>8} {'adapter':>7} {'verify':>6} "
          f"{'GGUF MB':>7}  fidelity")  # fmt: skip
    for name, wall, cpu, info in rows:
        t = info["timings"]
        fid = info.get("fidelity")
        fid_text = fidelity.describe(fid) if fid else "-"
        gguf_mb = [v for k, v in info["files"].items() if k.endswith(".gguf")][0] / 1e6
        print(
            f"{name:18} {wall:6.1f} {cpu:6.1f} {t.get('merge_f16_s', 0):9.1f} {t.get('quantize_s', 0):8.1f} "
            f"{t.get('adapter_s', 0):7.2f} {t.get('verify_s', 0):6.1f} {gguf_mb:7.1f}  {fid_text}"
        )
    print(
        "\ngoals: merged Q8_0 <= 20 s, adapter <= 2 s (wall: whole process; stage columns: in-process wall s)"
    )


if __name__ == "__main__":
    main()
