"""The sigmoid DPO loss (Rafailov et al. 2023) as plain math both backends call.

With summed response log-probs (prompt tokens masked) of the policy (pi) and the reference (ref):

    r_chosen   = beta * (log pi(y+|x) - log ref(y+|x))
    r_rejected = beta * (log pi(y-|x) - log ref(y-|x))
    loss       = -log sigmoid(r_chosen - r_rejected)          averaged over pairs

With an SFT weight w > 0 the objective also pulls the chosen answer's likelihood up (RPO, Pang et al. 2024):

    objective  = loss + w * (-log pi(y+|x) / |y+|)           per-token NLL of the chosen answer

Each pair's objective is multiplied by its weight before the mean: 1 for MIPO's pairs, `--user-weight` for
the pairs the user made (user_pairs.py).

DPO alone can lower the log-probs of both answers while it widens their gap, which moves the model away
from ordinary text too; the anchor on y+ (the model's own, context-guided answer) holds that back.

With an other-context KL weight k > 0, each pair with an anchor sequence (a response y' after a prompt
under a context c' that is not the user's; train/batching.py) adds

    k * mean over t of KL(ref(.|c',x,y'<t) || pi(.|c',x,y'<t))     at each token of y', whole vocabulary

By default c' is no context at all and y' the chosen answer (`--kl-anchor no-context`); the other choice
is the rejected answer under the persona it was sampled with (`rejected`). It asks the adapter to change
the answers under the user's context c only, which is what MIPO's mutual information between context and
answer rewards, and to keep every other context (and none) where the base had it. The whole next-token
distribution matters: the per-token NLL of y- alone (the base's own low-temperature sample) was measured
to sharpen the model and raise the drift instead (bench/README).

`xp` is the array module (numpy, torch or mlx.core): the formula is written once for all of them.
"""

from __future__ import annotations

from typing import Any


def dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, xp: Any):
    """Return (per-pair loss, chosen reward, rejected reward); inputs are 1-D arrays of summed log-probs."""
    r_chosen = beta * (policy_chosen - ref_chosen)
    r_rejected = beta * (policy_rejected - ref_rejected)
    margin = r_chosen - r_rejected
    # -log sigmoid(m) = log(1 + exp(-m)), written stably as softplus(-m).
    loss = xp.logaddexp(xp.zeros_like(margin), -margin)
    return loss, r_chosen, r_rejected


def dpo_objective(loss, policy_chosen, chosen_tokens, sft_weight: float, weights=None):
    """Per-pair training objective: the DPO loss plus `sft_weight` times the chosen answer's per-token NLL,
    times the pair's weight (`weights`, 1-D; None: every pair 1). A pair the user made weighs
    `--user-weight` (train/loop.py); MIPO's own pairs weigh 1.

    (The other-context KL term has its own forward and backward pass in each backend, so that its graph and
    the pair's are never held at once.)"""
    objective = loss - sft_weight * policy_chosen / chosen_tokens if sft_weight else loss
    return objective if weights is None else objective * weights


def dpo_metrics(loss, r_chosen, r_rejected) -> dict[str, float]:
    """Batch metrics from numpy arrays: mean loss, rewards, margin and reward accuracy."""
    import numpy as np

    loss, r_chosen, r_rejected = (np.asarray(x, dtype=np.float64) for x in (loss, r_chosen, r_rejected))
    return {
        "loss": float(loss.mean()),
        "reward_chosen": float(r_chosen.mean()),
        "reward_rejected": float(r_rejected.mean()),
        "margin": float((r_chosen - r_rejected).mean()),
        "accuracy": float((r_chosen > r_rejected).mean()),
    }
