"""The schedules of nanochat/optim.py: pretraining's by step, SFT's by progress through the
data, RL's linear decay (docs/training.md, "Schedules")."""

import math

import pytest

from nanochat.optim import lr_multiplier, lr_multiplier_by_progress, muon_momentum, muon_weight_decay


def test_lr_multiplier_warmup_flat_warmdown():
    N, warmup, ratio, final = 1000, 40, 0.65, 0.05
    lrm = [lr_multiplier(i, N, warmup, ratio, final) for i in range(N + 1)]
    assert lrm[0] == pytest.approx(1 / 40)
    assert lrm[39] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrm[:40], lrm[1:40]))  # rises during warmup
    W = round(ratio * N)  # 650
    assert all(v == 1.0 for v in lrm[40:N - W + 1])
    tail = lrm[N - W:]
    assert all(a > b for a, b in zip(tail, tail[1:]))  # falls during warmdown, never rises
    assert lrm[N] == pytest.approx(final)  # ends at the stated final fraction
    assert lrm[N - W // 2] == pytest.approx(0.5 + 0.5 * final, rel=1e-2)


def test_lr_multiplier_without_warmdown():
    assert lr_multiplier(99, 100, 0, 0.0, 0.0) == 1.0


def test_muon_momentum():
    N, ratio = 2000, 0.5
    assert muon_momentum(0, N, ratio) == pytest.approx(0.85)
    assert muon_momentum(200, N, ratio) == pytest.approx(0.91)
    assert muon_momentum(400, N, ratio) == pytest.approx(0.97)
    assert muon_momentum(1000, N, ratio) == pytest.approx(0.97)
    assert muon_momentum(1500, N, ratio) == pytest.approx(0.935)
    assert muon_momentum(2000, N, ratio) == pytest.approx(0.90)


def test_muon_weight_decay_cosine():
    assert muon_weight_decay(0, 100, 0.2) == pytest.approx(0.2)
    assert muon_weight_decay(50, 100, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(100, 100, 0.2) == pytest.approx(0.0, abs=1e-12)
    assert muon_weight_decay(25, 100, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))


def test_lr_multiplier_by_progress_for_sft_and_rl():
    f = lr_multiplier_by_progress
    assert f(0.0, 0.0, 0.5, 0.0) == 1.0 and f(0.5, 0.0, 0.5, 0.0) == 1.0  # SFT: flat for the first half
    assert f(0.75, 0.0, 0.5, 0.0) == pytest.approx(0.5) and f(1.0, 0.0, 0.5, 0.0) == 0.0
    assert f(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5)
    assert [f(s / 4, 0.0, 1.0, 0.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]  # RL: 1 - step / N, exactly


def test_muon_momentum_of_sft_ramps_without_a_warmdown():
    sft = [muon_momentum(s, warmup=300, peak=0.95) for s in (0, 150, 300, 1000)]
    assert sft[0] == 0.85 and sft[1] == pytest.approx(0.9) and sft[2] == sft[3] == pytest.approx(0.95)
