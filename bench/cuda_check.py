"""CUDA check: a few LoRA DPO steps of the default model with the torch backend on CUDA and on CPU, compared.

The same pairs, the same LoRA initialisation (seeded, made on the CPU before the move) and the same steps run
on the CPU in fp32 (the baseline), on the GPU in fp32 (must agree with the baseline to float rounding) and on
the GPU at the backend's automatic precision (bf16 where the GPU has it: agrees more loosely). Printed per
run: load seconds, training pairs/s, peak GPU memory, the loss of every step, and the largest difference of
a summed response log-prob from the baseline's, with the adapter off (the base) and on (after the steps).
Exits 1 when the GPU's fp32 numbers leave the tolerances below, 0 otherwise.

    python bench/cuda_check.py [--pairs 8] [--steps 4] [--words 60]
    python bench/cuda_check.py --device cpu   # the script itself, end to end, with the CPU standing in

Without a CUDA GPU it prints one line saying so and exits 0. A few minutes on one GPU (most of it the CPU
baseline).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import build_pairs  # noqa: E402

# fp32 on another device sums in another order: summed log-probs of ~100 tokens agree to a few 1e-3 nats.
FP32_LOGP_TOLERANCE = 0.05  # nats, per summed response log-prob
FP32_LOSS_TOLERANCE = 1e-3
BF16_LOGP_TOLERANCE = 2.0  # bf16 matrices: reported, never a failure


def encoded_pairs(base: Path, n: int, words: int, max_len: int):
    from mipo_local.chat import EncodedPair, chat_format

    cf = chat_format(str(base))
    out = []
    for p in build_pairs(n, words):
        e = cf.encode_pair(p["context"], p["prompt"], p["chosen"], p["rejected"])
        room = max_len - len(e.prompt)
        out.append(EncodedPair(e.prompt, e.chosen[:room], e.rejected[:room]))
    return out


def train_steps(base: Path, pairs, device: str, precision: str, steps: int, batch: int) -> dict:
    """Load the backend on `device`, score the base, take `steps` optimizer steps, score the policy."""
    import numpy as np
    import torch

    from mipo_local.train.backend import LoraConfig, PairBatch
    from mipo_local.train.torch_backend import TorchBackend

    backend = TorchBackend(precision=precision)
    t0 = time.monotonic()
    backend.load(base, LoraConfig(), seed=0, device=device)
    load_s = time.monotonic() - t0
    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(backend.device)
    ref_c, ref_r = backend.logprobs(pairs, adapter=False)
    losses, seen = [], 0
    t0 = time.monotonic()
    for step in range(steps):
        idx = [(step * batch + i) % len(pairs) for i in range(batch)]
        chunk = PairBatch([pairs[i] for i in idx], ref_c[idx], ref_r[idx])
        metrics = backend.accumulate(chunk, beta=0.1, loss_scale=1.0, sft_weight=1.0)
        backend.optimizer_step(5e-4)
        losses.append(metrics["loss"])
        seen += batch
    if cuda:
        torch.cuda.synchronize(backend.device)
    train_s = time.monotonic() - t0
    pol_c, pol_r = backend.logprobs(pairs, adapter=True)
    peak_mb = torch.cuda.max_memory_allocated(backend.device) / 2**20 if cuda else None
    result = {
        "device": str(backend.device),
        "bf16": backend.bf16,
        "load_s": load_s,
        "pairs_per_s": seen / train_s,
        "peak_gpu_mb": peak_mb,
        "losses": losses,
        "base": np.concatenate([ref_c, ref_r]),
        "policy": np.concatenate([pol_c, pol_r]),
    }
    del backend
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps, one micro-batch each")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step")
    ap.add_argument("--words", type=int, default=60, help="about this many words per answer")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: a dry run)")
    args = ap.parse_args()
    import numpy as np
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"bench/cuda_check.py: torch {torch.__version__} sees no CUDA GPU on this machine; nothing to check."
        )
        return 0
    from mipo_local import modelsource

    with tempfile.TemporaryDirectory(prefix="mipo-cuda-check-") as tmp:
        base = modelsource.prepare_default(Path(tmp))
        pairs = encoded_pairs(base, args.pairs, args.words, args.max_len)
        runs = {
            "baseline": train_steps(base, pairs, "cpu", "fp32", args.steps, args.batch),
            f"{args.device} fp32": train_steps(base, pairs, args.device, "fp32", args.steps, args.batch),
            f"{args.device} auto": train_steps(base, pairs, args.device, "auto", args.steps, args.batch),
        }
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    baseline = runs["baseline"]
    print(f"{args.pairs} pairs, {args.steps} steps of {args.batch} pairs, the default model\n")
    print("baseline: the CPU in fp32\n")
    print(f"{'run':<12}{'precision':>10}{'load s':>8}{'pairs/s':>9}{'peak GPU MB':>13}"
          f"{'max |d base|':>14}{'max |d policy|':>16}  losses")  # fmt: skip
    failed = []
    for label, r in runs.items():
        d_base = float(np.max(np.abs(r["base"] - baseline["base"])))
        d_policy = float(np.max(np.abs(r["policy"] - baseline["policy"])))
        d_loss = max(abs(a - b) for a, b in zip(r["losses"], baseline["losses"], strict=True))
        peak = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        print(f"{label:<12}{'bf16' if r['bf16'] else 'fp32':>10}{r['load_s']:>8.1f}{r['pairs_per_s']:>9.2f}"
              f"{peak:>13}{d_base:>14.4f}{d_policy:>16.4f}  " + " ".join(f"{x:.4f}" for x in r["losses"]))  # fmt: skip
        if label.endswith("fp32"):
            if max(d_base, d_policy) > FP32_LOGP_TOLERANCE or d_loss > FP32_LOSS_TOLERANCE:
                failed.append(
                    f"{label}: log-probs {max(d_base, d_policy):.4f} nats, loss {d_loss:.2e} from the CPU's"
                )
        elif r["bf16"] and max(d_base, d_policy) > BF16_LOGP_TOLERANCE:
            print(f"  note: {label} is {max(d_base, d_policy):.2f} nats from the CPU's fp32 (bf16 matrices)")
    ratio = runs[f"{args.device} auto"]["pairs_per_s"] / baseline["pairs_per_s"]
    print(f"\n{args.device} at its automatic precision trains {ratio:.1f}x the CPU's fp32 pairs/s")
    for line in failed:
        print("DISAGREES:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
