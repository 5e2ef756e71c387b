"""LoRA DPO training: mipo-local's torch backend vs TRL's DPOTrainer + PEFT LoRA, on the default model.

Both train the same pairs with the same hyperparameters (LoRA rank/alpha/targets, lr, beta, batch, grad
accumulation, epochs, max length) and the same thread count, one after the other, each in its own process
so that its peak RSS is its own. TRL runs at its best setting on this machine (bf16=True where the CPU has
bf16 instructions, fp32 elsewhere; its reference = the adapter switched off). Times exclude model loading
(reported apart) and include everything else: tokenization, reference
log-probs, training, writing the adapter.

"Useful" FLOPs per pair are the minimum the job needs: one reference forward and one forward + backward
(activations only: the base is frozen) over the prompt once and both responses, the output head at response
positions only; attention and LoRA are left out. They are divided by a matmul peak measured here in the
precision trained.

    python bench/train.py [--pairs 16] [--threads 2] [--rank 8] [--epochs 1] [--repeats 3] [--compare REV]

`--compare REV` adds mipo-local as it is at git revision REV (checked out in a temporary worktree), in the
same run: the current code must not be slower than the code it replaces.
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

TOPICS = (
    "dinner tonight", "a weekend trip", "saving money", "a birthday gift", "learning a language",
    "a morning routine", "a rainy afternoon", "a job interview", "a picnic", "sleeping better",
    "a small garden", "a new laptop", "a long flight", "a team lunch", "a first date", "a quiet evening",
)  # fmt: skip
SENTENCES = (
    "Start with something simple that you already enjoy.", "Keep it short and practical.",
    "Plan the first step tonight, then the rest tomorrow.", "Write down what worked last time.",
    "Ask a friend to join you, it makes it easier to keep going.", "Set a small budget before you begin.",
    "Pick a quiet moment of the day for it.", "Check the weather and pack a light jacket.",
    "Fresh vegetables and a little olive oil go a long way.", "Leave some room for a surprise.",
    "Take breaks and drink water.", "If it feels like too much, cut the plan in half.",
    "Try it once this week and see how it feels.", "Local markets often have the best ideas.",
)  # fmt: skip
USER = "I am Ana, a vegan chef in Lisbon. I like short, practical answers with one concrete idea."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_pairs(n: int, words: int) -> list[dict]:
    """Deterministic pairs: the user's context, a question, and two answers of about `words` words each."""
    import numpy as np

    from mipo_local.personas import persona_bank

    rng = np.random.default_rng(0)

    def answer() -> str:
        out: list[str] = []
        while sum(len(s.split()) for s in out) < words:
            out.append(SENTENCES[int(rng.integers(len(SENTENCES)))])
        return " ".join(out)

    bank = persona_bank()
    return [
        {
            "context": USER,
            "prompt": f"What do you suggest for {TOPICS[i % len(TOPICS)]}?",
            "chosen": "Ana, as a chef: " + answer(),
            "rejected": answer(),
            "neg_context": bank[(7 * i) % len(bank)],
        }
        for i in range(n)
    ]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    """CPU time of this process: less sensitive than wall time to other jobs on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- children -----------------------------------------------------------------------------------------------


def child_mipo(cfg: dict) -> dict:
    import numpy as np

    from mipo_local import modelsource
    from mipo_local.settings import TrainSettings
    from mipo_local.train import runs
    from mipo_local.train.loop import train
    from mipo_local.workspace import Workspace

    # A fresh workspace for every run, so that no run finds cached reference log-probs.
    ws = Workspace.open(cfg["workdir"] + f"/ws-{cfg['kind']}-{cfg.get('repeat', 0)}", create=True)
    modelsource.set_base_model(ws, cfg["model"])
    with ws.transaction() as conn:
        for i, p in enumerate(cfg["pairs"]):
            conn.execute(
                "INSERT INTO pairs(pair_key, prompt, context, neg_context, strategy, chosen, rejected, seed,"
                " settings, created_at) VALUES (?, ?, ?, ?, 'bench', ?, ?, 0, '{}', ?)",
                (
                    f"bench-{i}",
                    p["prompt"],
                    p["context"],
                    p["neg_context"],
                    p["chosen"],
                    p["rejected"],
                    time.time(),
                ),
            )
    h = cfg["hyper"]
    settings = TrainSettings(
        backend="torch", lr=h["lr"], beta=h["beta"], rank=h["rank"], alpha=h["alpha"], batch_size=h["batch_size"],
        grad_accum=h["grad_accum"], epochs=h["epochs"], max_len=h["max_len"], eval_fraction=0.0,
        threads=cfg["threads"], checkpoint_every=10**6, eval_every=10**6, precision=cfg["precision"],
        grad_checkpointing=cfg.get("grad_checkpointing", False),
        # TRL has no such term, and it adds about half the work (the SFT anchor reuses the chosen log-probs).
        other_context_kl=0.0,
    )  # fmt: skip
    gen = train(ws, settings, run_name="bench")
    cpu_loaded = None
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            summary = stop.value
            break
        if cpu_loaded is None and getattr(event, "message", "").startswith("Loaded in"):
            cpu_loaded = cpu_seconds()
    return {
        "load_s": summary.load_seconds,
        "train_s": summary.seconds - summary.load_seconds,
        "train_cpu_s": cpu_seconds() - cpu_loaded,
        "loss": float(np.mean([x["loss"] for x in runs.read_log(ws, runs.get_run(ws, "bench").id, "train")])),
    }


def child_trl(cfg: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(cfg["threads"])
    h = cfg["hyper"]
    model_path = Path(cfg["model"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    # The weights are dequantized to fp32 on load, but the model stays flagged as GGUF-"quantized", which
    # the Trainer refuses to train; drop the flag (what a user would get by converting to safetensors).
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    loaded, cpu_loaded = time.perf_counter(), cpu_seconds()
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in cfg["rendered"]])
    args = DPOConfig(
        output_dir=cfg["workdir"] + "/trl", per_device_train_batch_size=h["batch_size"],
        gradient_accumulation_steps=h["grad_accum"], num_train_epochs=h["epochs"], learning_rate=h["lr"],
        beta=h["beta"], max_length=h["max_len"], bf16=cfg["precision"] != "fp32", use_cpu=True,
        lr_scheduler_type="cosine", warmup_steps=0.1, save_strategy="no", report_to=[], logging_steps=1,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    peft = LoraConfig(r=h["rank"], lora_alpha=h["alpha"], target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft)
    out = trainer.train()
    trainer.model.save_pretrained(cfg["workdir"] + "/trl/adapter")  # the same end point: an adapter on disk
    done = time.perf_counter()
    return {"load_s": loaded - start, "train_s": done - loaded, "train_cpu_s": cpu_seconds() - cpu_loaded,
            "loss": out.training_loss}  # fmt: skip


def child_peak(cfg: dict) -> dict:
    """Best-of-several matmul rates with the same thread count: fp32, and bf16 when it is trained in. Without
    bf16 instructions (`--precision bf16` forced on such a CPU) a 2048-square bf16 matmul takes about a minute,
    so the emulated rate is measured on 512-square matrices."""
    import torch

    from mipo_local.train.torch_backend import cpu_has_fast_bf16

    torch.set_num_threads(cfg["threads"])
    rates = {}
    for dtype in (torch.bfloat16, torch.float32) if cfg["precision"] == "bf16" else (torch.float32,):
        n = 512 if dtype == torch.bfloat16 and not cpu_has_fast_bf16() else 2048
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = float("inf")
        for _ in range(8):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        rates[str(dtype).split(".")[-1]] = 2 * n**3 / best / 1e9
    return rates


PRECISION = {"bfloat16": "bf16", "float32": "fp32"}  # torch dtype name -> the name --precision uses


# -- parent ---------------------------------------------------------------------------------------------------


def useful_gflop_per_pair(model_path: Path, encoded) -> float:
    """3 forward passes' worth (reference; policy forward; backward through activations) of matmul FLOPs."""
    from mipo_local import gguf_io

    info = gguf_io.read_info(model_path)
    reader = gguf_io.open_reader(model_path)
    body = sum(int(t.n_elements) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    d, vocab = int(info.arch_key("embedding_length")), int(info.n_vocab if hasattr(info, "n_vocab") else 0)
    if not vocab:
        vocab = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    total = 0.0
    for e in encoded:
        unique = len(e.prompt) + len(e.chosen) + len(e.rejected)
        total += 3 * (2 * body * unique + 2 * d * vocab * (len(e.chosen) + len(e.rejected)))
    return total / len(encoded) / 1e9


def run_child(kind: str, cfg: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(cfg, fh)
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    if cfg.get("source"):  # another revision of mipo-local: its package first on the path
        env["PYTHONPATH"] = os.pathsep.join([cfg["source"], env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, fh.name], env=env, capture_output=True, text=True
    )
    os.unlink(fh.name)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--words", type=int, default=100, help="words per answer (~130 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="for both sides; auto: bf16 where the CPU has AVX512-BF16/AMX (TRL's best setting there), else fp32",
    )
    ap.add_argument("--only", choices=["mipo", "trl"], default=None, help="run one side (debugging)")
    ap.add_argument("--also-gc", action="store_true", help="add a mipo-local run with --grad-checkpointing")
    ap.add_argument("--repeats", type=int, default=1, help="run both sides this many times, alternating")
    ap.add_argument("--compare", default=None, metavar="REV", help="also run mipo-local at git revision REV")
    args = ap.parse_args()
    if args.precision == "auto":
        from mipo_local.train.torch_backend import cpu_has_fast_bf16

        # Without bf16 instructions a bf16 matmul is emulated (measured on an AVX2-only EPYC: 18 GFLOP/s
        # against 100 in fp32), so fp32 is then the best setting for both sides.
        args.precision = "bf16" if cpu_has_fast_bf16() else "fp32"

    from mipo_local.chat import chat_format
    from mipo_local.modelsource import prepare_default

    workdir = tempfile.mkdtemp(prefix="mipo-bench-train-")
    model = prepare_default(Path(workdir) / "model")
    pairs = build_pairs(args.pairs, args.words)
    cf = chat_format(str(model))
    encoded = [cf.encode_pair(p["context"], p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    rendered = [
        {
            "prompt": cf.prompt_text(p["context"], p["prompt"]),
            "chosen": cf.template.split([*msgs(p), {"role": "assistant", "content": p["chosen"]}])[1],
            "rejected": cf.template.split([*msgs(p), {"role": "assistant", "content": p["rejected"]}])[1],
        }
        for p in pairs
    ]
    hyper = {"lr": 5e-5, "beta": 0.1, "rank": args.rank, "alpha": 2.0 * args.rank, "batch_size": args.batch_size,
             "grad_accum": args.grad_accum, "epochs": args.epochs, "max_len": args.max_len}  # fmt: skip
    cfg = {"workdir": workdir, "model": str(model), "pairs": pairs, "rendered": rendered, "hyper": hyper,
           "threads": args.threads, "precision": args.precision}  # fmt: skip
    tokens = [len(e.prompt) + len(e.chosen) + len(e.rejected) for e in encoded]
    print(
        f"model {model.name}; {len(pairs)} pairs, {sum(tokens) / len(tokens):.0f} tokens each "
        f"(prompt {sum(len(e.prompt) for e in encoded) / len(encoded):.0f} + chosen + rejected); "
        f"r={args.rank}, batch {args.batch_size} x accum {args.grad_accum}, {args.epochs} epoch(s), "
        f"{args.threads} threads, {args.precision}",
        flush=True,
    )
    peak = run_child("peak", cfg)
    sides = [
        s for s in ("mipo", "mipo-gc", "trl") if args.only in (None, s) and (s != "mipo-gc" or args.also_gc)
    ]
    if args.compare:
        source = Path(workdir) / "compare"
        root = Path(__file__).resolve().parent.parent
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(source), args.compare],
                       check=True, capture_output=True)  # fmt: skip
        sides.insert(1, "mipo-rev")
    # Repeats alternate the sides (mipo, trl, mipo, trl, ...) so that a slow spell of the machine hits both;
    # each side's median-time run is reported, and the ratio of each repeat.
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeats):
        for s in sides:
            extra = {"source": str(source)} if s == "mipo-rev" else {}
            runs[s].append(run_child(s, {**cfg, "repeat": i, **extra}))
    if args.compare:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(source)], check=True)
    results = {s: sorted(r, key=lambda x: x["train_s"])[len(r) // 2] for s, r in runs.items()}
    gflop = useful_gflop_per_pair(model, encoded)
    n = len(pairs) * args.epochs
    print(
        "matmul peak here: "
        + ", ".join(f"{PRECISION[k]} {v:.3g} GFLOP/s" for k, v in peak.items() if k in PRECISION)
    )
    top = peak["bfloat16" if args.precision == "bf16" else "float32"]
    print(f"useful work: {gflop:.0f} GFLOP per pair")
    print(
        f"| trainer | load s | train s | pairs/s | train CPU s | pairs per CPU s | peak RSS GB | useful GFLOP/s | of {args.precision} peak | mean train loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"mipo": "mipo-local torch backend", "mipo-gc": "mipo-local, --grad-checkpointing",
             "mipo-rev": f"mipo-local at {args.compare}", "trl": f"TRL DPOTrainer + PEFT ({args.precision})"}  # fmt: skip
    for s, r in results.items():
        rate, cpu_rate = n / r["train_s"], n / r["train_cpu_s"]
        print(
            f"| {names[s]} | {r['load_s']:.1f} | {r['train_s']:.1f} | {rate:.3f} | {r['train_cpu_s']:.1f} "
            f"| {cpu_rate:.3f} | {r['peak_rss_mb'] / 1024:.2f} | {rate * gflop:.0f} "
            f"| {rate * gflop / top:.0%} | {r['loss']:.4f} |"
        )
    for other in ("trl", "mipo-rev"):
        if "mipo" not in results or other not in results:
            continue
        if args.repeats > 1:
            ratios = [t["train_s"] / m["train_s"] for m, t in zip(runs["mipo"], runs[other], strict=True)]
            print(f"pairs/s ratio to {names[other]}, each repeat: " + ", ".join(f"{r:.2f}x" for r in ratios))
        m, t = results["mipo"], results[other]
        goals = " (goals: >= 2.5x, <= 0.5x, load <= 0.5x)" if other == "trl" else " (goal: >= 1x)"
        print(
            f"mipo-local vs {names[other]}: pairs/s {t['train_s'] / m['train_s']:.2f}x (per CPU second "
            f"{t['train_cpu_s'] / m['train_cpu_s']:.2f}x), peak RSS {m['peak_rss_mb'] / t['peak_rss_mb']:.2f}x, "
            f"load {m['load_s'] / t['load_s']:.2f}x{goals}"
        )
    print(
        f"machine load average when done: {os.getloadavg()[0]:.1f} (timings are only comparable on a quiet machine)"
    )


def msgs(p: dict) -> list[dict]:
    from mipo_local.chat import build_messages

    return build_messages(p["context"], p["prompt"])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        config = {**json.loads(Path(sys.argv[3]).read_text()), "kind": sys.argv[2]}
        if sys.argv[2] == "mipo-gc":
            config["grad_checkpointing"] = True
        children = {"mipo": child_mipo, "mipo-gc": child_mipo, "mipo-rev": child_mipo, "trl": child_trl,
                    "peak": child_peak}  # fmt: skip
        result = children[sys.argv[2]](config)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
    else:
        main()
