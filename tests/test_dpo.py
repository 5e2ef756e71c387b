import math

import numpy as np
import pytest

from mipo_local.train.dpo import dpo_metrics, dpo_objective, dpo_terms
from mipo_local.train.loop import lr_at


def test_dpo_loss_matches_hand_computation():
    pc, pr, rc, rr = (
        np.array([-10.0, -5.0]),
        np.array([-12.0, -4.0]),
        np.array([-11.0, -5.0]),
        np.array([-11.0, -5.0]),
    )
    loss, r_c, r_r = dpo_terms(pc, pr, rc, rr, 0.1, np)
    # pair 0: r_c = 0.1*1 = 0.1, r_r = 0.1*(-1) = -0.1, margin 0.2 ; pair 1: r_c = 0, r_r = 0.1, margin -0.1
    expected = [-math.log(1 / (1 + math.exp(-0.2))), -math.log(1 / (1 + math.exp(0.1)))]
    assert loss == pytest.approx(expected)
    m = dpo_metrics(loss, r_c, r_r)
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx(0.05)
    assert m["loss"] == pytest.approx(sum(expected) / 2)


def test_dpo_loss_is_stable_for_large_margins():
    loss, _, _ = dpo_terms(np.array([0.0]), np.array([-1e5]), np.array([0.0]), np.array([0.0]), 1.0, np)
    assert loss[0] == pytest.approx(0.0) and np.isfinite(loss).all()
    loss, _, _ = dpo_terms(np.array([-1e5]), np.array([0.0]), np.array([0.0]), np.array([0.0]), 1.0, np)
    assert loss[0] == pytest.approx(1e5)


def test_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 20, 1e-4, 4) for s in range(20)]
    assert lrs[0] == pytest.approx(2.5e-5) and lrs[3] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] >= 1e-5


def test_sft_weight_adds_the_chosen_answers_per_token_nll():
    loss = np.array([0.7, 0.5])
    chosen_logp, chosen_tokens = np.array([-20.0, -6.0]), np.array([10.0, 3.0])
    assert dpo_objective(loss, chosen_logp, chosen_tokens, 0.0) is loss  # plain DPO untouched
    # per-token NLL of y+: 2.0 and 2.0; weight 0.5 adds 1.0 to each pair's loss
    assert dpo_objective(loss, chosen_logp, chosen_tokens, 0.5) == pytest.approx([1.7, 1.5])
