"""The ahead-of-time compiled decode step (nanochat/aot.py): built once per model shape by a
child process, found on disk by later engines without a build, the same tokens as the eager
step (greedy and seeded, alone and batched, rows joining mid-way), weight updates seen at the
next step, and every failure (a failed build, a corrupt package, a step that raises) decoding
eagerly with a warning. One build serves the whole module (~20-30 s on 2 cores)."""

import os
import shutil
import sys
import warnings

import pytest
import torch
from test_engine import build, columns, naive_greedy, run_session

from nanochat import aot
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import Engine

pytestmark = [
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                       reason="building the compiled step needs a C++ compiler"),
    pytest.mark.skipif(COMPUTE_DTYPE != torch.float32, reason="exact token equality needs float32"),
]

SHAPE = dict(n_head=4, n_kv_head=2, sequence_len=256, window_pattern="SL")  # GQA and a sliding window


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    base = str(tmp_path_factory.mktemp("aot_base"))
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = base
    try:
        engine = Engine(build(**SHAPE), tokenizer, aot=True)
        assert engine.aot and engine.wait_for_compile(), "the build failed: see the .failed log under " + base
    finally:
        if old is None:
            del os.environ["NANOCHAT_BASE_DIR"]
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return base


@pytest.fixture
def aot_dir(built, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", built)
    return built


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from helpers import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


def test_a_second_engine_loads_the_package_without_building(aot_dir, tokenizer):
    engine = Engine(build(**SHAPE, seed=5), tokenizer, aot=True)  # other weights, the same shape
    assert engine._aot_step() is not None
    assert engine._aot_build.proc is None  # found on disk: no child process
    assert os.listdir(os.path.join(aot_dir, "aot")) == [os.path.basename(engine._aot_build.path)]


@pytest.mark.parametrize("prompt", [[5], [291, 40, 41, 42, 43], list(range(60, 77))])
def test_greedy_tokens_equal_the_full_forward(aot_dir, tokenizer, prompt):
    model = build(**SHAPE)
    engine = Engine(model, tokenizer, aot=True)
    assert engine.wait_for_compile()
    ref = naive_greedy(model, tokenizer, prompt, 40)
    assert [c[0] for c in columns(engine, prompt, max_tokens=40, temperature=0.0)] == ref
    for column in columns(engine, prompt, num_samples=3, max_tokens=40, temperature=0.0)[:len(ref)]:
        assert len(set(column)) == 1  # every row of a batch gives the lone row's tokens


def test_seeded_rows_batched_or_joining_give_the_tokens_they_give_alone(aot_dir, tokenizer):
    engine = Engine(build(**SHAPE), tokenizer, aot=True, batch_invariant=True)
    assert engine.wait_for_compile()
    p1, p2 = [291, 40, 41, 42, 43], list(range(60, 77))
    alone = {}
    for p, seed in ((p1, 3), (p2, 9)):
        sess = engine.session()
        (rid,) = sess.add(p, max_tokens=30, seed=seed, top_k=50)
        alone[seed] = run_session(sess)[0][rid]
    sess = engine.session()
    (a,) = sess.add(p1, max_tokens=30, seed=3, top_k=50)
    out, (b,) = run_session(sess, joins=[(4, dict(tokens=p2, max_tokens=30, seed=9, top_k=50))])
    assert out[a] == alone[3] and out[b] == alone[9]
    assert engine._aot_run is not None and engine.aot  # the compiled step did the decoding


def test_tokens_equal_the_eager_step_when_sampling(aot_dir, tokenizer):
    model = build(**SHAPE)
    kw = dict(num_samples=4, max_tokens=60, temperature=0.9, top_p=0.95, seed=1)
    eager = columns(Engine(model, tokenizer, aot=False), [291, 40, 41], **kw)
    compiled = Engine(model, tokenizer, aot=True)
    assert compiled.wait_for_compile()
    # sampled tokens can differ only where a draw falls within float rounding of a boundary
    assert columns(compiled, [291, 40, 41], **kw) == eager


def test_in_place_weight_updates_reach_the_next_step(aot_dir, tokenizer):
    model = build(**SHAPE)
    engine = Engine(model, tokenizer, aot=True)
    assert engine.wait_for_compile()
    prompt = [291, 40, 41, 42, 43]
    assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == naive_greedy(model, tokenizer, prompt, 16)
    for change in (lambda: model.transformer.h[1].attn.c_v.weight.mul_(-3.0), lambda: model.resid_lambdas.mul_(0.3)):
        with torch.no_grad():
            change()
        ref = naive_greedy(model, tokenizer, prompt, 16)
        assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == ref


def test_a_failed_build_decodes_eagerly_and_is_not_retried(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(aot.Build, "command", lambda self, config: [sys.executable, "-c", "raise SystemExit('no nanochat here')"])
    model = build(**SHAPE)
    engine = Engine(model, tokenizer, aot=True)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        assert not engine.wait_for_compile()
    assert not engine.aot
    failed = [f for f in os.listdir(tmp_path / "aot") if f.endswith(".failed")]
    assert len(failed) == 1 and "no nanochat here" in (tmp_path / "aot" / failed[0]).read_text()
    prompt = [291, 40, 41, 42, 43]
    assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == naive_greedy(model, tokenizer, prompt, 16)
    again = Engine(model, tokenizer, aot=True)
    with pytest.warns(UserWarning, match="earlier build failed"):
        assert again._aot_step() is None
    assert again._aot_build.proc is None and not again.aot


def test_a_corrupt_package_or_a_failing_step_decodes_eagerly(aot_dir, tokenizer, monkeypatch, tmp_path):
    model = build(**SHAPE)
    prompt = [291, 40, 41, 42, 43]
    ref = naive_greedy(model, tokenizer, prompt, 16)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    path = aot.package_path(model)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not a package")
    engine = Engine(model, tokenizer, aot=True)
    with pytest.warns(UserWarning, match="delete the file to rebuild it"):
        assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == ref
    assert not engine.aot
    monkeypatch.setenv("NANOCHAT_BASE_DIR", aot_dir)
    engine = Engine(model, tokenizer, aot=True)
    assert engine.wait_for_compile()
    monkeypatch.setattr(engine._aot_run, "loader", None)  # the next call raises
    with pytest.warns(UserWarning, match="compiled decode step failed"):
        assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == ref
    assert not engine.aot


def test_aot_is_the_cpu_default_and_the_env_var_turns_it_off(tokenizer, monkeypatch):
    model = build(**SHAPE)
    monkeypatch.delenv("NANOCHAT_ENGINE_AOT")
    assert Engine(model, tokenizer).aot
    monkeypatch.setenv("NANOCHAT_ENGINE_AOT", "0")
    assert not Engine(model, tokenizer).aot
    assert not Engine(model, tokenizer, compile=True).aot  # torch.compile asked for: that one
    model.lm_head.to(torch.float64)
    assert not aot.supported(model)  # a matmul weight outside the compute dtype: eager
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setenv("NANOCHAT_ENGINE_AOT", "2")
        with pytest.raises(Exception, match="not understood"):
            Engine(model, tokenizer)


def test_a_build_in_progress_elsewhere_is_waited_for_not_repeated(tokenizer, monkeypatch, tmp_path):
    """Another process's builder holds <key>.building: a second engine starts no build of its own,
    and loads the package once that builder has put it there; a lock whose builder is dead is
    taken over."""
    import subprocess

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model = build(**SHAPE)
    path = aot.package_path(model)
    os.makedirs(os.path.dirname(path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(path[:-4] + ".building", "w") as f:
            f.write(str(other.pid))
        engine = Engine(model, tokenizer, aot=True)
        assert engine._aot_step() is None and engine._aot_build.proc is None and engine._aot_build.other == other.pid
        assert not engine.wait_for_compile(timeout=0.5)  # still building elsewhere
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match="another process's build"):
        assert engine._aot_step() is None  # that builder died without a package
    assert not engine.aot
    again = Engine(model, tokenizer, aot=True)
    again._aot_build = aot.Build(model)  # the dead builder's lock is taken over: a build of our own
    assert again._aot_build.proc is not None
    again._aot_build.proc.kill()
    again._aot_build.proc.wait()
