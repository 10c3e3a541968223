"""Pretraining schedules (SPEC §3.4)."""

import math

import pytest

from nanochat.optim import lr_multiplier, muon_momentum, muon_weight_decay


def test_lr_multiplier_warmup_flat_warmdown():
    N, warmup, ratio, final = 1000, 40, 0.65, 0.05
    lrm = [lr_multiplier(i, N, warmup, ratio, final) for i in range(N + 1)]
    assert lrm[0] == pytest.approx(1 / 40)
    assert lrm[39] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrm[:40], lrm[1:40]))  # rises during warmup
    W = round(ratio * N)  # 650
    assert all(v == 1.0 for v in lrm[40:N - W + 1])
    tail = lrm[N - W:]
    assert all(a > b for a, b in zip(tail, tail[1:]))  # falls during warmdown (upstream once had it backwards)
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
