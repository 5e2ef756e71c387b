"""Every default in one place. CLI flags default to None and override a field only when given.

The numbers follow the MIPO paper (arXiv 2603.19294) where it states them (temperature 0.1, top_p 0.9,
DPO beta 0.1, one epoch) and bench/quality.py where it measured better on the default model: two pairs per
prompt of 128-token answers with a guided positive, and LoRA DPO at lr 5e-4 (LoRA needs a far higher rate
than the paper's full fine-tuning, 5e-7) with an SFT anchor on the chosen answer, which at that rate keeps
the model's other text in place (bench/README.md has the tables).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

NEGATIVE_STRATEGIES = ("random-context", "no-context", "random-prompt")
CONTEXT_TURNS = ("user", "system")
ROUND_INITS = ("continue", "fresh")
ROUND_REFS = ("base", "previous")
QUANT_TYPES = ("auto", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class PairSettings:
    strategy: str = "random-context"  # how the negative y- is sampled (NEGATIVE_STRATEGIES)
    per_prompt: int = 2  # pairs per (context, prompt)
    temperature: float = 0.1
    top_p: float = 0.9
    max_tokens: int = 128  # response length cap for both sides
    seed: int = 0
    score: bool = True  # store log p(y|c,x) and log p(y|c',x) for both sides
    min_pmi: float | None = None  # drop pairs whose positive PMI margin is below this
    candidates: int = 1  # >1: sample K per side and keep the best-PMI positive / worst negative
    # Context-contrastive sampling of the positive: y+ ~ p(y|c,x)[p(y|c,x)/p(y|c',x)]^g token by token, the
    # per-token form of MIPO's pointwise MI. 0 samples plainly, as the paper does; bench/README.md shows why 1.
    guidance: float = 1.0
    # llama.cpp's repetition penalty over the last 64 tokens, for both answers: at temperature 0.1 the
    # default model's prompted answers loop 32% of the time without it and 1% with 1.1 (bench/decoding.py),
    # so far fewer positives are passed over as degenerate (bench/README.md).
    repeat_penalty: float = 1.1
    # Where the contexts sit while both answers are sampled: "user" writes the context (the user's, or the
    # negative's random one) at the head of the question's turn, "system" as the system turn. Training and
    # every answer a person reads keep it in the system turn, so the model learns to do from the system turn
    # what the base does only when the wish sits next to the question: at temperature 0.1 the default
    # model's positives meet the wish 0.36 of the time against 0.14 (bench/README.md, positives probe).
    context_turn: str = "user"
    batch_size: int = 16  # sequences decoded together in one llama.cpp batch


@dataclass
class SynthSettings:
    n: int = 16  # synthetic prompts to add
    seed: int = 0
    temperature: float = 0.7  # higher than MIPO's 0.1: the questions should vary


@dataclass
class TrainSettings:
    backend: str = "auto"  # auto | torch | mlx
    device: str = "auto"  # auto | cpu | cuda
    epochs: int = 1
    lr: float = 5e-4
    beta: float = 0.1
    sft_weight: float = 1.0  # weight of the chosen answer's per-token NLL added to the DPO loss (RPO)
    # Weight of the KL from the base to the model on each pair's anchor sequence: keeps the model's answers
    # outside the user's context where the base had them. 0: off. The sequence (train/batching.py):
    # "no-context": the chosen answer with no system turn; "rejected": the rejected answer under the context
    # it was sampled with. bench/README.md measures both.
    other_context_kl: float = 30.0
    kl_anchor: str = "no-context"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    batch_size: int = 1  # pairs per step
    grad_accum: int = 4
    max_len: int = 512  # prompt + response tokens; longer pairs are truncated on the response side
    warmup_ratio: float = 0.1
    eval_fraction: float = 0.1  # held-out share of pairs
    eval_every: int = 10  # optimizer steps between held-out evaluations
    checkpoint_every: int = 10  # optimizer steps between checkpoints
    ref: str = "cached"  # cached (training backend, adapter off) | llama.cpp
    seed: int = 0
    threads: int | None = None  # None: torch / MLX defaults
    grad_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 where fast: CUDA, AVX512-BF16/AMX CPUs) | bf16 | fp32
    # Self-improvement rounds (rounds.py): train on the pairs that run `from_run`'s model sampled. `round_init`:
    # continue that run's LoRA or start a fresh one; `round_ref`: DPO's reference is the base model or that
    # run's model. `round` is set by training itself: 1 + the round of `from_run`.
    from_run: str | None = None
    round_init: str = "continue"
    round_ref: str = "base"
    round: int = 1
    # Weight of each pair the user made (user_pairs.py) on the DPO objective; MIPO's pairs weigh 1, and 0
    # leaves the user's pairs out. Provisional: 2.0 is a first choice, not yet measured (the simulated-user
    # benchmark of issue 28 is to settle it).
    user_weight: float = 2.0


@dataclass
class ExportSettings:
    quant: str = "auto"  # Q8_0 under 1B parameters, Q4_K_M above
    adapter_only: bool = False
    system_from_contexts: bool = True  # write the user's contexts as the Modelfile SYSTEM
    verify: bool = True
    min_sign_agreement: float = 0.95  # fidelity below this share of same-sign DPO margins gets a warning
    verify_pairs: int = 16  # held-out pairs the fidelity check scores (the first by id); bounds its time
    threads: int | None = None  # llama.cpp threads for quantizing and verifying (None: all cores)


@dataclass
class AnswerSettings:
    """How an answer a person reads is sampled: `chat`, the app's Chat screen, `eval`'s answers, and the
    exported Modelfile's PARAMETERs (same names in Ollama), so the answer in Ollama is the answer in the
    app. The repetition penalty keeps a small model out of loops (bench/decoding.py measures it against
    plain sampling and llama.cpp's DRY, which Ollama does not have)."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int = 512


@dataclass
class EvalSettings:
    n: int = 16  # held-out prompts
    seed: int = 0
    temperature: float = 0.1
    top_p: float = 0.9
    max_tokens: int = 192
    # The chat's penalties (AnswerSettings): the answers compared are the kind a user gets.
    repeat_penalty: float = AnswerSettings.repeat_penalty
    repeat_last_n: int = AnswerSettings.repeat_last_n
    top_k: int = AnswerSettings.top_k


@dataclass
class Settings:
    pairs: PairSettings = field(default_factory=PairSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


T = TypeVar("T")


def with_overrides(obj: T, **overrides: Any) -> T:
    """Copy a settings dataclass, replacing only the fields whose override is not None."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return dataclasses.replace(obj, **given)  # type: ignore[type-var]
