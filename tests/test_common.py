"""common.training_session gives an in-process caller its interpreter back as it was."""

import gc
import os
import signal

from nanochat.common import StopRequest, training_session


def test_training_session_restores_env_signals_and_gc(monkeypatch):
    monkeypatch.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_KEEP", "1")
    before = signal.getsignal(signal.SIGTERM)
    with training_session():
        StopRequest()  # installs its own handlers, as the training loops do
        os.environ["NANOCHAT_TASK_DATA_DIR"] = "/somewhere"
        os.environ["NANOCHAT_KEEP"] = "2"
        gc.freeze()
        gc.disable()
        assert signal.getsignal(signal.SIGTERM) is not before
    assert "NANOCHAT_TASK_DATA_DIR" not in os.environ and os.environ["NANOCHAT_KEEP"] == "1"
    assert signal.getsignal(signal.SIGTERM) is before
    assert gc.isenabled() and gc.get_freeze_count() == 0
