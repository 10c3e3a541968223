"""MuonAdamW (nanochat/optim.py): AdamW against torch's, Muon's orthogonalisation,
cautious weight decay, convergence, determinism, checkpoint round trips, compiled == eager,
and 2 gloo ranks == 1 rank with the averaged gradient."""

import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import optim
from nanochat.common import NanochatError
from nanochat.optim import MuonAdamW


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    # Most tests check the math, which is the same eager or compiled; eager keeps them fast.
    # test_compiled_matches_eager covers the compiled kernels.
    monkeypatch.setenv("NANOCHAT_COMPILE_OPTIM", "0")


def leaf(t):
    return torch.nn.Parameter(t.clone())


def snapshot(opt, params):
    """Params and optimizer state as plain cloned tensors (state_dict() aliases live state)."""
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf)


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"max abs diff {(a.float() - b.float()).abs().max().item()}"


# -----------------------------------------------------------------------------
# AdamW


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    inits = [torch.randn(5), torch.randn(40, 30), torch.randn(3, 4, 5)]
    ours = [leaf(t) for t in inits]
    ref = [leaf(t) for t in inits]
    opt = MuonAdamW([
        {"kind": "adamw", "params": ours[:2], "lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.1},
        {"kind": "adamw", "params": ours[2:], "lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0},
    ])
    ref_opt = torch.optim.AdamW([
        {"params": ref[:2], "lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.1},
        {"params": ref[2:], "lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0},
    ], foreach=False)
    for _ in range(10):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.data, q.data, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_adamw_bf16_param_tracks_fp32_reference():
    torch.manual_seed(0)
    init = torch.randn(64, 48).bfloat16()
    p = leaf(init)
    q = leaf(init.float())
    opt = MuonAdamW([{"kind": "adamw", "params": [p], "lr": 1e-2, "betas": (0.8, 0.995), "eps": 1e-10,
                      "weight_decay": 0.01}])
    ref_opt = torch.optim.AdamW([q], lr=1e-2, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01, foreach=False)
    for _ in range(10):
        g = torch.randn(64, 48)
        p.grad, q.grad = g.bfloat16(), g.bfloat16().float()
        opt.step()
        ref_opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
    # bf16 keeps 8 bits: one rounding of p per step (rel 2^-9) on values of size ~1, and
    # moments stored in bf16, over 10 steps of size <= lr.
    torch.testing.assert_close(p.data.float(), q.data, rtol=2e-2, atol=1e-2)
    # And the bf16 run moved the way the fp32 one did (not just stayed within tolerance of the start).
    cos = torch.cosine_similarity((p.data.float() - init.float()).flatten(), (q.data - init.float()).flatten(), dim=0)
    assert cos > 0.9, cos


# -----------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("use_bf16", [False, True], ids=["fp32", "bf16"])
def test_first_muon_update_is_near_semi_orthogonal(shape, use_bf16):
    torch.manual_seed(0)
    K, (rows, cols) = 3, shape
    params = torch.randn(K, rows, cols)
    before = params.clone()
    momentum = torch.zeros(K, rows, cols)
    second = torch.zeros(K, rows, 1) if rows >= cols else torch.zeros(K, 1, cols)
    lr = 0.02 * math.sqrt(max(1.0, rows / cols))
    hp = [torch.tensor(v) for v in (0.95, lr, 0.0, 0.9)]  # momentum, lr, wd, beta2
    optim.muon_kernel(torch.randn(K, rows, cols), params, momentum, second, *hp, 5, use_bf16)
    update = (before - params) / lr
    for u in update:
        # Muon+ then NorMuon (which preserves the total norm): Frobenius = sqrt(min(rows, cols)).
        assert math.isclose(u.norm().item(), math.sqrt(min(rows, cols)), rel_tol=1e-2 if use_bf16 else 1e-4)
        s = torch.linalg.svdvals(u.double())
        # Five Polar Express iterations do not converge exactly (by design); a square Gaussian
        # matrix has singular values down to ~1/n of its largest, which still end up within 4x.
        assert s.max() / s.min() < 4, s


def test_muon_tall_matrices_get_larger_lr():
    torch.manual_seed(0)
    tall = leaf(torch.randn(64, 16))
    wide = leaf(torch.randn(16, 64))
    before = [tall.detach().clone(), wide.detach().clone()]
    opt = MuonAdamW([{"kind": "muon", "params": [tall], "lr": 0.02}, {"kind": "muon", "params": [wide], "lr": 0.02}])
    tall.grad, wide.grad = torch.randn(64, 16), torch.randn(16, 64)
    opt.step()
    # Muon scales its LR by sqrt(max(1, rows/cols)), so a 4:1 tall matrix moves 2x as far.
    assert math.isclose((before[0] - tall).norm().item(), 0.02 * 2 * 4, rel_tol=1e-4)
    assert math.isclose((before[1] - wide).norm().item(), 0.02 * 4, rel_tol=1e-4)


def test_cautious_weight_decay_hand_built():
    # A diagonal gradient: row equilibration, Polar Express, Muon+ and NorMuon all keep it
    # diagonal with entries +-1, so the update direction is exactly known.
    p = leaf(torch.ones(2, 2))
    opt = MuonAdamW([{"kind": "muon", "params": [p], "lr": 0.1, "weight_decay": 0.5}])
    p.grad = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    opt.step()
    lr, wd = 0.1, 0.5
    # g = [[1, 0], [0, -1]]; mask = g*p >= 0 = [[T, T], [T, F]]: the decay skips only the entry
    # where the update points away from zero (and does apply where g == 0).
    expected = torch.tensor([[1 - lr - lr * wd, 1 - lr * wd], [1 - lr * wd, 1 + lr]])
    torch.testing.assert_close(p.data, expected, rtol=0, atol=1e-5)


def test_cautious_weight_decay_mask_on_random_update():
    torch.manual_seed(0)
    init, grad = torch.randn(24, 40), torch.randn(24, 40)
    results = []
    for wd in (0.0, 0.3):
        p = leaf(init)
        opt = MuonAdamW([{"kind": "muon", "params": [p], "lr": 0.05, "weight_decay": wd}])
        p.grad = grad.clone()
        opt.step()
        results.append(p.detach().clone())
    no_wd, with_wd = results
    g = (init - no_wd) / 0.05
    mask = (g * init) >= 0
    assert 0.2 < mask.float().mean() < 0.8  # both cases occur
    assert torch.equal(with_wd[~mask], no_wd[~mask])  # opposite signs: no decay at all
    torch.testing.assert_close(with_wd[mask], (no_wd - 0.05 * 0.3 * init)[mask], rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# Whole optimizer: convergence, determinism, checkpoints


def make_problem(seed=0):
    """8 params: small, large and large-bf16 AdamW, a wide Muon stack of 3 and a tall stack of 2."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16,), (64, 32), (16, 48), (16, 48), (16, 48), (48, 16), (48, 16)]
    params = [leaf(torch.randn(s, generator=g) * 0.5) for s in shapes]
    params.append(leaf((torch.randn(32, 64, generator=g) * 0.5).bfloat16()))
    targets = [(p.detach().float() + 0.25 * torch.randn(p.shape, generator=g)).to(p.dtype) for p in params]
    groups = [
        {"kind": "adamw", "params": [params[0], params[1], params[7]], "lr": 0.05, "initial_lr": 0.05,
         "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0},
        {"kind": "muon", "params": params[2:5], "lr": 0.05, "initial_lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
        {"kind": "muon", "params": params[5:7], "lr": 0.05, "initial_lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    ]
    return params, targets, groups


def quadratic_step(opt, params, targets):
    for p, t in zip(params, targets):
        p.grad = (p.detach() - t).to(p.dtype)  # gradient of 0.5 * ||p - t||^2
    opt.step()


def test_convergence_on_quadratic():
    params, targets, groups = make_problem()
    opt = MuonAdamW(groups)
    start = [(p.detach().float() - t.float()).norm().item() for p, t in zip(params, targets)]
    for _ in range(50):
        quadratic_step(opt, params, targets)
    end = [(p.detach().float() - t.float()).norm().item() for p, t in zip(params, targets)]
    for i, (s, e) in enumerate(zip(start, end)):
        assert e < 0.5 * s, f"param {i} {tuple(params[i].shape)}: distance {s:.3f} -> {e:.3f}"


def run_steps(opt, params, targets, steps, first=0):
    for it in range(first, first + steps):
        for group in opt.param_groups:  # what base_train does each step
            group["lr"] = group["initial_lr"] * (1.0 - 0.02 * it)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.01 * it
                group["weight_decay"] = 0.1 * (1 + math.cos(math.pi * it / 20)) / 2
        quadratic_step(opt, params, targets)


def test_determinism_two_runs_bitwise_equal():
    results = []
    for _ in range(2):
        params, targets, groups = make_problem()
        opt = MuonAdamW(groups)
        run_steps(opt, params, targets, 5)
        results.append(snapshot(opt, params))
    a, b = results
    for x, y in zip(a["params"], b["params"]):
        assert_bitwise(x, y)
    for i, state in a["opt"]["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                assert_bitwise(v, b["opt"]["state"][i][k])
            else:
                assert v == b["opt"]["state"][i][k]


def test_state_dict_round_trip_continues_bitwise():
    params, targets, groups = make_problem()
    opt = MuonAdamW(groups)
    run_steps(opt, params, targets, 4)
    saved = snapshot(opt, params)
    run_steps(opt, params, targets, 4, first=4)

    params2, targets2, groups2 = make_problem()
    with torch.no_grad():
        for p, s in zip(params2, saved["params"]):
            p.copy_(s)
    for g in groups2:
        g["lr"] = 123.0  # overwritten by the checkpoint
    opt2 = MuonAdamW(groups2)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[1]["momentum"] == 0.85 + 0.01 * 3  # the schedule's value at the save
    assert set(opt2.state[params2[2]]) == {"momentum_buffer", "second_momentum_buffer"}  # Muon state on first param
    run_steps(opt2, params2, targets2, 4, first=4)
    for p, q in zip(params, params2):
        assert_bitwise(p.detach(), q.detach())


def test_load_state_dict_rejects_other_layout():
    params, targets, groups = make_problem()
    opt = MuonAdamW(groups)
    run_steps(opt, params, targets, 1)
    sd = snapshot(opt, params)["opt"]
    sd["state"][3]["momentum_buffer"] = sd["state"][3]["momentum_buffer"][:2]  # as if another rank count
    with pytest.raises(NanochatError, match="rank 0 of 1 expects"):
        MuonAdamW(make_problem()[2]).load_state_dict(sd)


def test_bad_groups_are_rejected():
    with pytest.raises(NanochatError, match="one shape"):
        MuonAdamW([{"kind": "muon", "params": [leaf(torch.zeros(2, 3)), leaf(torch.zeros(3, 2))], "lr": 0.1}])
    with pytest.raises(NanochatError, match="kind"):
        MuonAdamW([{"params": [leaf(torch.zeros(2))], "lr": 0.1}])


# -----------------------------------------------------------------------------
# Compiled kernels


def test_compiled_matches_eager_without_recompiling(monkeypatch):
    from torch._dynamo.utils import counters

    runs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("NANOCHAT_COMPILE_OPTIM", mode)
        torch.manual_seed(0)
        params = [leaf(torch.randn(32, 16)), leaf(torch.randn(2, 16, 32)[0]), leaf(torch.randn(16, 32))]
        targets = [torch.randn_like(p) for p in params]
        opt = MuonAdamW([{"kind": "adamw", "params": params[:1], "lr": 0.01, "initial_lr": 0.01},
                         {"kind": "muon", "params": params[1:], "lr": 0.02, "initial_lr": 0.02}])
        run_steps(opt, params, targets, 1)
        graphs = counters["stats"]["unique_graphs"]
        assert mode == "0" or graphs >= 2, "the kernels were not compiled"
        run_steps(opt, params, targets, 3, first=1)  # lr, momentum and wd all change
        if mode == "1":
            assert counters["stats"]["unique_graphs"] == graphs, "hyperparameter change recompiled a kernel"
        runs[mode] = [p.detach().clone() for p in params]
    for e, c in zip(runs["0"], runs["1"]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Distributed: 2 gloo ranks, each with half the batch == 1 rank with the averaged gradient

DIST_STEPS, DIST_MORE = 3, 2


def dist_problem():
    """Covers every path: small all-reduced (8,), sharded fp32 (64, 32) and bf16 (32, 64),
    (33, 32) >= 1024 elements but odd rows (all-reduce fallback), a Muon stack of K=3 (rank 0
    owns 2, rank 1 owns 1 and pads 1) and of K=1 (rank 1 owns nothing)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(8,), (64, 32), (33, 32), (16, 32), (16, 32), (16, 32), (32, 16)]
    params = [leaf(torch.randn(s, generator=g) * 0.5) for s in shapes]
    params.insert(3, leaf((torch.randn(32, 64, generator=g) * 0.5).bfloat16()))
    groups = [
        {"kind": "adamw", "params": params[:4], "lr": 0.02, "initial_lr": 0.02, "betas": (0.8, 0.95),
         "eps": 1e-10, "weight_decay": 0.01},
        {"kind": "muon", "params": params[4:7], "lr": 0.02, "initial_lr": 0.02, "weight_decay": 0.05},
        {"kind": "muon", "params": params[7:], "lr": 0.02, "initial_lr": 0.02, "weight_decay": 0.05},
    ]
    return params, groups


def half_batch_grads(params, step, half):
    """Gradients of a per-param linear regression on half `half` (0 or 1) of an 8-example batch."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = []
    for p in params:
        x = torch.randn(8, *p.shape, generator=gen)[4 * half:4 * half + 4]
        y = torch.randn(8, generator=gen)[4 * half:4 * half + 4]
        loss = ((x * p).flatten(1).sum(1) - y).square().mean()
        grads.append(torch.autograd.grad(loss, p)[0])
    return grads


def dist_worker(rank, world, init_file, out_dir):
    os.environ["NANOCHAT_COMPILE_OPTIM"] = "0"
    # a rendezvous file, not a "free" port another process could take between probe and bind
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params, groups = dist_problem()
        opt = MuonAdamW(groups)
        assert opt.world_size == world and opt.rank == rank
        saved = None
        for step in range(DIST_STEPS + DIST_MORE):
            if step == DIST_STEPS:
                saved = snapshot(opt, params)
            for p, grad in zip(params, half_batch_grads(params, step, rank)):
                p.grad = grad
            opt.step()
        # Resume from the per-rank shard taken after DIST_STEPS and redo the last steps.
        params2, groups2 = dist_problem()
        with torch.no_grad():
            for p, s in zip(params2, saved["params"]):
                p.copy_(s)
        opt2 = MuonAdamW(groups2)
        opt2.load_state_dict(saved["opt"])
        for step in range(DIST_STEPS, DIST_STEPS + DIST_MORE):
            for p, grad in zip(params2, half_batch_grads(params2, step, rank)):
                p.grad = grad
            opt2.step()
        torch.save({"params": [p.detach() for p in params], "resumed": [p.detach() for p in params2],
                    "opt": opt.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_rank_with_averaged_grads(tmp_path):
    mp.spawn(dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)

    params, groups = dist_problem()
    opt = MuonAdamW(groups)
    assert opt.world_size == 1
    for step in range(DIST_STEPS + DIST_MORE):
        g0, g1 = half_batch_grads(params, step, 0), half_batch_grads(params, step, 1)
        for p, a, b in zip(params, g0, g1):
            p.grad = (a + b) / 2  # what the ranks' SUM-then-divide computes
        opt.step()

    # Exact: averaging two grads is exact, and every AdamW op is elementwise and every Muon
    # reduction per matrix, so updating a slice/chunk gives the bits of updating the whole.
    ref_state = opt.state_dict()["state"]
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (p, q, r) in enumerate(zip(params, out["params"], out["resumed"])):
            assert_bitwise(q, p.detach())
            assert_bitwise(r, p.detach()), f"rank {rank} param {i}: resume diverged"
        state = out["opt"]["state"]
        # sharded AdamW: this rank's rows of the reference moments
        for i in (1, 3):
            rows = params[i].shape[0] // 2
            assert_bitwise(state[i]["exp_avg_sq"], ref_state[i]["exp_avg_sq"][rank * rows:(rank + 1) * rows])
        for i in (0, 2):  # replicated AdamW state
            assert_bitwise(state[i]["exp_avg"], ref_state[i]["exp_avg"])
        # Muon K=3: chunks of 2, rank 0 owns [0, 2), rank 1 owns [2, 3)
        lo, hi = (0, 2) if rank == 0 else (2, 3)
        assert_bitwise(state[4]["momentum_buffer"], ref_state[4]["momentum_buffer"][lo:hi])
        assert_bitwise(state[4]["second_momentum_buffer"], ref_state[4]["second_momentum_buffer"][lo:hi])
        # Muon K=1: rank 0 owns it, rank 1 holds no state for it
        assert (7 in state) == (rank == 0)
