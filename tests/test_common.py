"""common and training: interpreter_restored gives an in-process caller its interpreter back as
it was, and a training script exports nothing into the environment; the TF32 setting, device
sync and the peak-rate tables."""

import gc
import os
import signal

import pytest
import torch

from nanochat.common import NanochatError, enable_tf32, get_peak_bandwidth, get_peak_flops, synchronize
from nanochat.training import StopRequest, interpreter_restored

INF = float("inf")


def test_interpreter_restored_puts_back_signals_and_gc():
    before = signal.getsignal(signal.SIGTERM)
    with interpreter_restored():
        StopRequest()  # installs its own handlers, as the training loops do
        gc.freeze()
        gc.disable()
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_training_script_passes_data_dir_and_sandbox_without_exporting_them(monkeypatch, tmp_path):
    from scripts import chat_rl

    monkeypatch.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    before = dict(os.environ)
    with pytest.raises(NanochatError, match="no sft model to start RL from"), interpreter_restored():
        chat_rl.train(chat_rl.parse_args(["--device-type=cpu", f"--data-dir={tmp_path}", "--sandbox=strict"]))
    assert dict(os.environ) == before


# -----------------------------------------------------------------------------
# TF32, device sync and the datasheet tables behind MFU / bandwidth utilization


def test_enable_tf32_keeps_the_legacy_getter_and_inductor_working():
    """compute_init's TF32 setting must leave torch.get_float32_matmul_precision() readable (torch
    2.13 raises once the per-backend fp32_precision API was used) and let inductor compile."""
    try:
        enable_tf32()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        a, b = torch.randn(16, 32), torch.randn(32, 8)
        f = torch.compile(lambda a, b: (a @ b).relu(), dynamic=False)
        torch.testing.assert_close(f(a, b), (a @ b).relu())
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_synchronize_waits_for_mps_and_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    synchronize(torch.device("mps"))
    synchronize("cuda")
    synchronize("cpu")
    assert calls == ["mps", "cuda"]


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA A40", 149.7e12), ("NVIDIA RTX A4000", INF),  # "a40" is not a word of "RTX A4000"
    ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", 2.25e15), ("NVIDIA GB200", 2.5e15), ("NVIDIA A10", 125e12), ("NVIDIA A10G", INF),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 4090 Laptop GPU", INF),
    ("NVIDIA GeForce RTX 3090", 71e12), ("NVIDIA GeForce RTX 3090 Ti", 80e12), ("NVIDIA GeForce RTX 5090", 209.5e12),
    ("NVIDIA RTX A6000", 154.8e12), ("NVIDIA RTX 6000 Ada Generation", 364.2e12), ("Quadro RTX 6000", INF),
    ("Tesla T4", INF), ("AMD Instinct MI300X", 1.3074e15), ("AMD Instinct MI250X/MI250", 383e12),
])
def test_peak_flops_by_whole_model_name(name, flops):
    assert get_peak_flops(name) == flops


@pytest.mark.parametrize("name, bandwidth", [
    ("NVIDIA A100-SXM4-40GB", 1.555e12), ("NVIDIA A100-PCIE-40GB", 1.555e12), ("NVIDIA A100-SXM4-80GB", 2.039e12),
    ("NVIDIA A100 80GB PCIe", 1.935e12), ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H200", 4.8e12), ("NVIDIA L4", 300e9), ("NVIDIA L40S", 864e9), ("NVIDIA GeForce RTX 4090", 1.008e12),
    ("NVIDIA RTX A4000", INF),
])
def test_peak_bandwidth_by_whole_model_name(name, bandwidth):
    assert get_peak_bandwidth(name) == bandwidth
