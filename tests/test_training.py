"""nanochat/training.py: the step meter's timing, ETA and log record, and the checkpointer's
save cadence. Resume and stop end to end are tested through the three scripts
(tests/test_base_train.py, test_chat_sft.py, test_chat_rl.py)."""

import gc
import json

import pytest
import torch

from nanochat import training
from nanochat.common import DummyWandb, NanochatError
from nanochat.training import Checkpointer, StepMeter, interpreter_restored


class Clock:
    """time.time() for the meter: each start() .. log() pair takes the next of `durations`."""

    def __init__(self, durations):
        self.durations, self.now, self.calls = list(durations), 0.0, 0

    def __call__(self):
        self.calls += 1
        if self.calls % 2 == 0:  # the log() end of a step
            self.now += self.durations.pop(0)
        return self.now


def run_meter(monkeypatch, tmp_path, capsys, durations, start_step=0, horizon=None, dones=None):
    monkeypatch.setattr(training.time, "time", Clock(durations))
    meter = StepMeter(str(tmp_path / "train_log.jsonl"), device=torch.device("cpu"), ddp=False, world_size=1,
                      master=True, wandb_run=DummyWandb(), peak_flops=1e9, start_step=start_step)
    with interpreter_restored():
        for i, step in enumerate(range(start_step, start_step + len(durations))):
            meter.start()
            done = dones[i] if dones else (step + 1) / horizon
            meter.log(step, done, {"loss": "1.0"}, {"loss": 1.0}, tokens=1000, flops=5e8, horizon=horizon)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    records = [json.loads(ln) for ln in open(tmp_path / "train_log.jsonl")]
    return meter, lines, records


def test_eta_is_the_session_mean_without_its_first_step_times_the_steps_left(monkeypatch, tmp_path, capsys):
    # step 0 takes 10 s (compilation), then 1 s, 3 s: mean 2 s over the steps after the first
    _, lines, records = run_meter(monkeypatch, tmp_path, capsys, [10.0, 1.0, 3.0], horizon=63)
    assert lines[0].startswith("step 00000/00063 (1.59%) | loss: 1.0 | dt: 10000.00ms | tok/sec: 100 | mfu: 5.00 |")
    assert lines[0].endswith("eta: nanm")  # nothing but the warm-up step measured yet
    assert lines[1].endswith(f"eta: {61 * 1.0 / 60:.1f}m")
    assert lines[2].endswith(f"eta: {60 * 2.0 / 60:.1f}m")
    assert records[2] == {"step": 2, "loss": 1.0, "dt": 3.0, "tok_per_sec": 333, "mfu": pytest.approx(100 * 5e8 / 3 / 1e9)}


def test_eta_without_a_horizon_follows_the_fraction_done(monkeypatch, tmp_path, capsys):
    # no step count (SFT by epoch): a quarter done after 2 steps -> 6 more steps of 2 s each
    _, lines, _ = run_meter(monkeypatch, tmp_path, capsys, [5.0, 2.0], dones=[0.1, 0.25])
    assert lines[1].startswith("step 00001 (25.00%)") and lines[1].endswith(f"eta: {6 * 2.0 / 60:.1f}m")


def test_training_time_leaves_out_the_warmup_steps_and_the_collector_is_frozen_after_a_session_first_step(
        monkeypatch, tmp_path, capsys):
    frozen = []
    monkeypatch.setattr(training.gc, "freeze", lambda: frozen.append(True))
    meter, _, _ = run_meter(monkeypatch, tmp_path, capsys, [1.0] * 5, start_step=8, horizon=20)
    assert meter.training_time == 2.0  # steps 11 and 12; 8, 9 and 10 may include compilation
    assert frozen == [True]  # once, after step 8, the first of this session
    assert gc.isenabled()  # interpreter_restored gave the collector back


class Never:
    signum = None

    def requested(self, device, ddp):
        return False


def test_saves_are_due_at_the_cadence_and_the_last_step_but_not_at_the_resumed_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path), Never(), rank=0, world_size=1, device=torch.device("cpu"), ddp=False,
                        save_every=3)
    ckpt.resume_step = 6
    assert [s for s in range(6, 11) if ckpt.due(s, last_step=s == 10)] == [9, 10]


def test_check_space_asks_for_twelve_bytes_a_parameter_per_kept_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(10, 10)  # 110 parameters: 1320 bytes a checkpoint
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    free = {"bytes": 3 * 1320}
    monkeypatch.setattr("nanochat.common.shutil.disk_usage", lambda path: type("Usage", (), {"free": free["bytes"]}))
    kwargs = dict(rank=0, world_size=1, device=torch.device("cpu"), ddp=False)
    Checkpointer(str(tmp_path), Never(), keep_last=3, **kwargs).check_space(model)
    Checkpointer(str(tmp_path), Never(), **kwargs).check_space(model)  # keeps all: room for one is asked
    free["bytes"] -= 1
    with pytest.raises(NanochatError, match="free some space"):
        Checkpointer(str(tmp_path), Never(), keep_last=3, **kwargs).check_space(model)


def test_accumulation_steps_fill_the_total_batch_exactly_or_refuse_with_the_fix(capsys):
    assert training.accumulation_steps(4 * 2 * 64 * 3, 4, 64, 2, "fix it") == 3
    assert "gradient accumulation steps: 3" in capsys.readouterr().out
    with pytest.raises(NanochatError, match=r"= 4\*64\*2 = 512; pass --device-batch-size\.$"):
        training.accumulation_steps(512 * 3 + 64, 4, 64, 2, "pass --device-batch-size")
