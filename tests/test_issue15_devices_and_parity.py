"""Issue 15, items 7-11 and 14: no float64 on the device (Apple's MPS has none), fp16 loss
scaling in SFT/RL, the batch-size/weight-decay rule for every tokens:params ratio, optimizer
shards from ranks that own no rows, the loss under no_grad, and the initial weights' draw order.
Tiny models on CPU."""

import contextlib
import io
import math
import os

import pytest
import torch
from helpers import make_tiny_base_checkpoint
from test_chat_rl import EvenFirstChar
from test_chat_sft import _conversations, _write_jsonl
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig
from scripts import chat_rl, chat_sft


class NoFloat64(TorchDispatchMode):
    """Fails the first op that makes a float64 tensor. The code has no device-dependent branch
    for these dtypes, so what runs here on CPU is what would run on MPS."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor; MPS has no float64")
        return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base_dir = str(tmp_path_factory.mktemp("i15_base"))
    info = make_tiny_base_checkpoint(base_dir, seq_len=128)
    info["train"] = _write_jsonl(os.path.join(base_dir, "train.jsonl"), _conversations(60, seed=1))
    info["val"] = _write_jsonl(os.path.join(base_dir, "val.jsonl"), _conversations(20, seed=2))
    return info


@pytest.fixture
def base_env(base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base["base_dir"])
    monkeypatch.setenv("NANOCHAT_ENGINE_COMPILE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return base


def _sft_args(base, tag, steps, extra=()):
    return [f"--model-tag={base['model_tag']}", f"--mixture={base['train']}", f"--val-mixture={base['val']}",
            f"--num-iterations={steps}", "--device-batch-size=2", "--total-batch-size=256", "--eval-every=1",
            "--eval-tokens=512", "--chatcore-every=-1", "--compile=0", "--peak-flops=1e12",
            "--device-type=cpu", f"--output-tag={tag}", *extra]


def _rl_args(tag, steps, extra=()):
    return ["-i", "base", "--model-tag=tiny", f"--num-iterations={steps}", "--device-batch-size=4", "--num-samples=4",
            "--examples-per-step=1", "--max-new-tokens=2", "--eval-every=1", "--eval-examples=2",
            "--save-every=-1", "--device-type=cpu", "--peak-flops=1e12", f"--output-tag={tag}", *extra]


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# -----------------------------------------------------------------------------
# item 7: float64 never reaches the device


def test_item7_sft_stop_flags_and_bpb_make_no_float64(base_env):
    with NoFloat64():
        summary = _quiet(chat_sft.main, _sft_args(base_env, "f64", 2))  # eval at steps 0, 1, 2
    assert summary["steps"] == 2


def test_item7_sft_epoch_mode_makes_no_float64(base_env):
    with NoFloat64():
        summary = _quiet(chat_sft.main, _sft_args(base_env, "f64epoch", 0, ["--eval-every=-1", "--total-batch-size=2048"]))
    assert summary["steps"] >= 1


def test_item7_rl_stats_and_pass_at_k_make_no_float64(base_env):
    with NoFloat64():
        summary = _quiet(chat_rl.main, _rl_args("f64", 1), train_task=EvenFirstChar(4), val_task=EvenFirstChar(4))
    assert summary["steps"] == 1


# -----------------------------------------------------------------------------
# item 14: one seed gives the reference implementation's initial weights


def test_item14_init_draw_order_matches_the_reference_sequence():
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)
    torch.manual_seed(7)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()

    # the reference's sequence of draws, re-derived by hand: vocab padded to 128, kv width 32,
    # value embeddings (and their gates) on layers 0 and 2
    torch.manual_seed(7)
    d, V, kv, s = 64, 128, 32, 3**0.5 / 8
    expected = {"transformer.wte.weight": torch.empty(V, d).normal_(0, 0.8),
                "lm_head.weight": torch.empty(V, d).normal_(0, 0.001)}
    for i in range(3):
        expected[f"transformer.h.{i}.attn.c_q.weight"] = torch.empty(d, d).uniform_(-s, s)
        expected[f"transformer.h.{i}.attn.c_k.weight"] = torch.empty(kv, d).uniform_(-s, s)
        expected[f"transformer.h.{i}.attn.c_v.weight"] = torch.empty(kv, d).uniform_(-s, s)
        expected[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.empty(4 * d, d).uniform_(-0.4 * s, 0.4 * s)
        expected[f"transformer.h.{i}.attn.c_proj.weight"] = torch.zeros(d, d)
        expected[f"transformer.h.{i}.mlp.c_proj.weight"] = torch.zeros(d, 4 * d)
    expected["smear_gate.weight"] = torch.empty(1, 24).uniform_(0, 0.02)
    for i in (0, 2):
        expected[f"value_embeds.{i}.weight"] = torch.empty(V, kv).uniform_(-s, s)
    for i in (0, 2):
        expected[f"transformer.h.{i}.attn.ve_gate.weight"] = torch.empty(1, 12).uniform_(0, 0.02)
    # the scalars: Python floats (double) rounded once to fp32
    expected["resid_lambdas"] = torch.tensor([1.15 - 0.10 * i / 2 for i in range(3)])
    expected["x0_lambdas"] = torch.tensor([0.20 - 0.15 * i / 2 for i in range(3)])
    expected["smear_lambda"] = torch.zeros(1)
    expected["backout_lambda"] = torch.full((1,), 0.2)

    state = model.state_dict()
    assert set(state) == set(expected)
    for name, want in expected.items():
        assert torch.equal(state[name].float(), want), name


def test_item14_residual_scalars_are_rounded_once_from_double():
    """Over 20 layers, fp32 arithmetic on a ramp and double arithmetic rounded once disagree in
    the last bit for some layers; the init must give the latter."""
    n = 20
    config = GPTConfig(sequence_len=64, vocab_size=64, n_layer=n, n_head=1, n_kv_head=1, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    want_resid = torch.tensor([1.15 - 0.10 * i / (n - 1) for i in range(n)])
    want_x0 = torch.tensor([0.20 - 0.15 * i / (n - 1) for i in range(n)])
    ramp = torch.arange(n, dtype=torch.float32) / (n - 1)
    assert not (torch.equal(1.15 - 0.10 * ramp, want_resid) and torch.equal(0.20 - 0.15 * ramp, want_x0))
    assert torch.equal(model.resid_lambdas.detach(), want_resid)
    assert torch.equal(model.x0_lambdas.detach(), want_x0)


# -----------------------------------------------------------------------------
# item 11: no gradient work in the fused loss under no_grad; pinned host memory for SFT batches


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=32, vocab_size=200, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.lm_head.weight.data.normal_(0, 0.05)
    model.fused_loss = True
    return model


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_item11_fused_loss_does_no_gradient_work_without_grad(monkeypatch, reduction):
    from nanochat import kernels
    calls = []
    backward = kernels._LossChunks.backward
    monkeypatch.setattr(kernels._LossChunks, "backward", lambda self, *a: calls.append(1) or backward(self, *a))
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 200, (2, 32), generator=g), torch.randint(0, 200, (2, 32), generator=g)
    y[0, :5] = -1
    with torch.no_grad():
        quiet = model(x, y, loss_reduction=reduction)
    with torch.inference_mode():
        inference = model(x, y, loss_reduction=reduction)
    assert calls == []  # no dz, grad_h or grad_w for a loss nobody differentiates
    with_grad = model(x, y, loss_reduction=reduction)
    if reduction != "none":
        assert calls  # the grad-enabled path does its gradient sweep in forward: the counter sees it
    assert torch.equal(quiet, with_grad.detach()) and torch.equal(inference, quiet)


def test_item11_sft_loader_copies_through_pinned_memory_on_cuda(monkeypatch):
    """No GPU here: a fake CUDA device records what the copy asks for."""
    seen = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: seen.append("pin") or self)
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            seen.append(("to", kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    t = torch.arange(6).view(2, 3)
    assert torch.equal(chat_sft.to_device(t, torch.device("cuda")), t)
    assert seen == ["pin", ("to", True)]
    seen.clear()
    assert chat_sft.to_device(t, torch.device("cpu")) is t and seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_item11_sft_loader_batches_reach_cuda_intact():
    t = torch.arange(12).view(3, 4)
    out = chat_sft.to_device(t, torch.device("cuda"))
    assert out.is_cuda and torch.equal(out.cpu(), t)


# -----------------------------------------------------------------------------
# item 9: the batch/weight-decay rule for every tokens:params ratio


# scaling parameters (transformer matrices + lm_head) at vocab 32768, seq 2048, SSSL, head dim 128:
# d12 = 12 * (12 * 768^2) + 6 ve gates * 12*6 + 32768*768; d20 and d24 likewise
D12, D20, D24 = 110_100_912, 435_160_240, 729_810_624


@pytest.mark.parametrize("ratio", [12, 8, 10.5, -1, 0])
def test_item9_batch_and_weight_decay_follow_the_reference_rule(ratio):
    from scripts.base_train import batch_and_weight_decay, config_for, parse_args, scaling_params
    args = parse_args([])
    assert [scaling_params(config_for(args, d, 32768)) for d in (12, 20, 24)] == [D12, D20, D24]
    # d20: 2^19 * (D20/D12)^0.383 = 887,496 -> 2^20; wd 0.28 * sqrt(2) * D12/D20 = 0.1002
    batch, wd = batch_and_weight_decay(ratio, D20, D12, -1, 0.28)
    assert batch == 2**20 and wd == pytest.approx(0.28 * 2**0.5 * D12 / D20, rel=1e-9)
    assert round(wd, 4) == 0.1002
    # d24: 1,081,866 -> 2^20; wd 0.0597
    batch, wd = batch_and_weight_decay(ratio, D24, D12, -1, 0.28)
    assert batch == 2**20 and round(wd, 4) == 0.0597
    # d12 itself: the reference batch, weight decay unchanged
    assert batch_and_weight_decay(ratio, D12, D12, -1, 0.28) == (2**19, 0.28)
    # an explicit batch is kept; the weight decay still scales with it
    batch, wd = batch_and_weight_decay(ratio, D20, D12, 2**18, 0.28)
    assert batch == 2**18 and wd == pytest.approx(0.28 * 0.5**0.5 * D12 / D20, rel=1e-9)


# -----------------------------------------------------------------------------
# item 10: the reference's optimizer shards load on every rank layout


def _optimizer_on_rank(model, rank, world_size):
    """A MuonAdamW whose sharding arithmetic is that of `rank` of `world_size` (load_state_dict
    needs no communication, so no process group is started)."""
    opt = model.setup_optimizer()
    opt.rank, opt.world_size = rank, world_size
    return opt


def _reference_shard(model, opt, seed):
    """The shard the reference implementation writes on opt's rank: every Muon group keeps a full
    chunk of ceil(K/W) matrices on its first parameter (on every rank, owned or not); AdamW state
    is row-sliced for large params whose rows divide by W."""
    g = torch.Generator().manual_seed(seed)
    shard = opt.state_dict()
    index = 0
    for group in opt.param_groups:
        for j, p in enumerate(group["params"]):
            if group["kind"] == "muon":
                if j == 0:
                    chunk = -(-len(group["params"]) // opt.world_size)
                    rows, cols = p.shape
                    second = (chunk, rows, 1) if rows >= cols else (chunk, 1, cols)
                    shard["state"][index] = {"momentum_buffer": torch.randn(chunk, rows, cols, generator=g),
                                             "second_momentum_buffer": torch.randn(*second, generator=g)}
            else:
                shape = tuple(p.shape)
                if p.numel() >= 1024 and shape[0] % opt.world_size == 0:
                    shape = (shape[0] // opt.world_size, *shape[1:])
                shard["state"][index] = {"step": 3, "exp_avg": torch.randn(shape, generator=g),
                                         "exp_avg_sq": torch.rand(shape, generator=g)}
            index += 1
    return shard


@pytest.mark.parametrize("world_size", [2, 8])
def test_item10_reference_shards_load_on_ranks_that_own_few_or_no_matrices(world_size):
    # 3 layers: Muon groups of 3 matrices (c_q, c_k, ..., 2 ve gates); on 2 ranks rank 1 owns 1 of
    # a chunk of 2, on 8 ranks ranks 3-7 own none of a chunk of 1
    model = GPT(GPTConfig(sequence_len=32, vocab_size=200, n_layer=3, n_head=2, n_kv_head=2, n_embd=64))
    for rank in range(world_size):
        opt = _optimizer_on_rank(model, rank, world_size)
        shard = _reference_shard(model, opt, seed=rank)
        opt.load_state_dict(shard)
        index = 0
        for group in opt.param_groups:
            if group["kind"] == "muon":
                K = len(group["params"])
                chunk = -(-K // world_size)
                owned = max(0, min(chunk, K - rank * chunk))
                state = opt.state.get(group["params"][0], {})
                if owned == 0:
                    assert state == {}
                else:
                    saved = shard["state"][index]
                    assert torch.equal(state["momentum_buffer"], saved["momentum_buffer"][:owned])
                    assert torch.equal(state["second_momentum_buffer"], saved["second_momentum_buffer"][:owned])
            else:
                for j, p in enumerate(group["params"]):
                    assert torch.equal(opt.state[p]["exp_avg"], shard["state"][index + j]["exp_avg"])
            index += len(group["params"])


def test_item10_a_shard_of_another_model_does_not_blame_the_rank_count():
    small = GPT(GPTConfig(sequence_len=32, vocab_size=200, n_layer=3, n_head=2, n_kv_head=2, n_embd=64))
    wide = GPT(GPTConfig(sequence_len=32, vocab_size=200, n_layer=3, n_head=2, n_kv_head=2, n_embd=128))
    shard = _reference_shard(wide, _optimizer_on_rank(wide, 0, 2), seed=0)
    with pytest.raises(NanochatError) as e:
        _optimizer_on_rank(small, 0, 2).load_state_dict(shard)
    message = str(e.value)
    assert "rank 0 of 2 expects" in message and "different number of ranks" not in message


# -----------------------------------------------------------------------------
# item 8: fp16 loss scaling in SFT and RL; inf/NaN steps skipped on every rank alike


def _muon_problem(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    groups = [{"kind": "muon", "params": params, "lr": 0.02, "momentum": 0.95, "ns_steps": 5, "beta2": 0.9,
               "weight_decay": 0.0, "initial_lr": 0.02}]
    from nanochat.optim import MuonAdamW
    return params, MuonAdamW(groups)


def test_item8_optimizer_step_skips_inf_steps_and_backs_off(capsys):
    from nanochat.optim import optimizer_step
    params, opt = _muon_problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # as a training step would scale its loss (this sets up the scale)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 1024.0 * 0.01)
    params[1].grad[0, 0] = float("inf")
    assert optimizer_step(opt, scaler, 0) is False
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert scaler.get_scale() == 512.0
    assert "step 00000: inf/NaN gradients under fp16, step skipped (loss scale now 512)" in capsys.readouterr().out
    for p in params:
        p.grad = torch.full_like(p, 512.0 * 0.01)
    assert optimizer_step(opt, scaler, 1) is True
    assert "skipped" not in capsys.readouterr().out
    assert not any(torch.equal(p, b) for p, b in zip(params, before))
    # the gradients reached the optimizer unscaled: same step as an unscaled run
    ref_params, ref = _muon_problem()
    for p in ref_params:
        p.grad = torch.full_like(p, 0.01)
    ref.step()
    assert all(torch.equal(p, r) for p, r in zip(params, ref_params))


def _sync_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from nanochat.optim import optimizer_step
        params, opt = _muon_problem()
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale(torch.ones(()))
        results = []
        for step in range(2):
            for p in params:
                p.grad = torch.full_like(p, 4.0 * 0.01 * (rank + 1))
            if step == 0 and rank == 1:
                params[2].grad[1, 1] = float("nan")  # only rank 1 overflows
            results.append(optimizer_step(opt, scaler, step))
        torch.save({"results": results, "params": [p.detach() for p in params], "scale": scaler.get_scale()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_item8_ranks_agree_on_skipping_a_step(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["results"] == r1["results"] == [False, True]
    assert r0["scale"] == r1["scale"] == 2.0
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))


def _never_finite_scaler(device):
    # an infinite loss scale makes every scaled gradient inf/NaN: every step must be skipped
    return torch.amp.GradScaler(device.type, init_scale=float("inf"))


def _same_weights(checkpoint_dir, step, base):
    from nanochat.checkpoint import load_checkpoint
    trained, _, _ = load_checkpoint(checkpoint_dir, step, "cpu")
    original, _, _ = load_checkpoint(base["checkpoint_dir"], base["step"], "cpu")
    return all(torch.equal(trained[k].float(), original[k].float()) for k in original)


def test_item8_sft_skips_inf_steps_under_loss_scaling(base_env, monkeypatch):
    monkeypatch.setattr(chat_sft, "grad_scaler", _never_finite_scaler)
    summary = _quiet(chat_sft.main, _sft_args(base_env, "fp16skip", 2, ["--eval-every=-1"]))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 2
    assert _same_weights(summary["checkpoint_dir"], 2, base_env)
    # a finite scale trains as usual
    monkeypatch.setattr(chat_sft, "grad_scaler", lambda device: torch.amp.GradScaler(device.type, init_scale=2.0**10))
    summary = _quiet(chat_sft.main, _sft_args(base_env, "fp16train", 2, ["--eval-every=-1"]))
    assert summary["skipped_steps"] == 0 and not _same_weights(summary["checkpoint_dir"], 2, base_env)


def test_item8_rl_skips_inf_steps_under_loss_scaling(base_env, monkeypatch):
    monkeypatch.setattr(chat_rl, "grad_scaler", _never_finite_scaler)
    summary = _quiet(chat_rl.main, _rl_args("fp16skip", 2, ["--eval-every=-1", "--save-every=2"]),
                     train_task=EvenFirstChar(4), val_task=EvenFirstChar(4))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 2
    assert _same_weights(summary["checkpoint_dir"], 2, base_env)


def test_item8_fp16_runs_get_a_scaler(monkeypatch):
    import nanochat.optim as optim
    monkeypatch.setattr(optim, "COMPUTE_DTYPE", torch.float16)
    assert isinstance(optim.grad_scaler(torch.device("cpu")), torch.amp.GradScaler)
    monkeypatch.setattr(optim, "COMPUTE_DTYPE", torch.bfloat16)
    assert optim.grad_scaler(torch.device("cpu")) is None


def test_item7_bpb_sum_is_exact_and_independent_of_batching():
    """The fixed-point int64 sum gives the same bits however the tokens are split into batches
    (as across ranks), and needs no float64."""
    from nanochat.loss_eval import evaluate_bpb
    torch.manual_seed(3)
    losses = torch.rand(4, 16) * 12  # per-token losses of 4 rows
    targets = torch.randint(0, 50, (4, 16))
    targets[0, :3] = -1
    token_bytes = torch.randint(0, 4, (50,))

    class TableLoss:
        def __call__(self, x, y, loss_reduction="none"):
            return losses[x[:, 0]]

    rows = torch.arange(4)[:, None].expand(4, 16)
    whole = [(rows, targets)]
    split = [(rows[i:i + 1], targets[i:i + 1]) for i in (3, 1, 0, 2)]
    with NoFloat64():
        one = evaluate_bpb(TableLoss(), iter(whole), 1, token_bytes)
        four = evaluate_bpb(TableLoss(), iter(split), 4, token_bytes)
    counted = (targets >= 0) & (token_bytes[targets.clamp(min=0)] > 0)
    expected = losses[counted].double().sum().item() / (math.log(2) * token_bytes[targets[counted]].sum().item())
    assert one == four and one == pytest.approx(expected, rel=1e-9)
