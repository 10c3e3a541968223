"""The docs stay true: docs/model.md's constants table against the code, and every relative
link in docs/*.md, README.md and CONTRIBUTING.md against the files (and headings) it names."""

import ast
import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from nanochat import gpt, kernels
from nanochat.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md", REPO / "CONTRIBUTING.md"]
STATISTICAL = 0.03  # relative tolerance of values measured on a random init (>= 16K samples each)


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def _tiny_model():
    """Big enough tables for init statistics: wte and lm_head hold 262K values, c_q/c_k/c_v 49K."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def _std(tensors):
    return torch.cat([t.detach().float().flatten() for t in tensors]).std().item()


def code_values():
    """{table key: (value in the code, relative tolerance)}."""
    model = _tiny_model()
    d = model.config.n_embd
    blocks = model.transformer.h
    groups = model.param_groups()
    group_of = {id(p): g for g in groups for p in g["params"]}
    adamw_eps = {g["eps"] for g in groups if g["kind"] == "adamw"}
    assert len(adamw_eps) == 1, "the AdamW groups disagree on eps; the table has one value"
    muon = [g for g in groups if g["kind"] == "muon"]
    assert len({(g["momentum"], g["ns_steps"]) for g in muon}) == 1, "the Muon groups disagree; the table has one value"
    config_defaults = GPTConfig()
    exact = {
        "GPTConfig.sequence_len": config_defaults.sequence_len,
        "GPTConfig.vocab_size": config_defaults.vocab_size,
        "GPTConfig.window_pattern": config_defaults.window_pattern,
        "from_depth.aspect_ratio": _defaults(GPTConfig.from_depth)["aspect_ratio"],
        "from_depth.head_dim": _defaults(GPTConfig.from_depth)["head_dim"],
        "ROPE_BASE": gpt.ROPE_BASE,
        "QK_SCALE": gpt.QK_SCALE,
        "VE_GATE_CHANNELS": gpt.VE_GATE_CHANNELS,
        "SMEAR_CHANNELS": gpt.SMEAR_CHANNELS,
        "SOFTCAP": gpt.SOFTCAP,
        "LOSS_CHUNK_ELEMENTS": kernels.LOSS_CHUNK_ELEMENTS,
        "mlp_ratio": blocks[0].mlp.c_fc.weight.shape[0] / d,
        "pad_vocab_size_to": _defaults(GPT.__init__)["pad_vocab_size_to"],
        "rotary_length_factor": model.rotary_seq_len / model.config.sequence_len,
        "short_window_at_2048": gpt.compute_window_sizes(GPTConfig(sequence_len=2048, n_layer=2, window_pattern="SL"))[0][0],
        "init.c_proj": max(b.attn.c_proj.weight.abs().max().item() + b.mlp.c_proj.weight.abs().max().item() for b in blocks),
        "init.resid_lambdas": (model.resid_lambdas[0].item(), model.resid_lambdas[-1].item()),
        "init.x0_lambdas": (model.x0_lambdas[0].item(), model.x0_lambdas[-1].item()),
        "init.smear_lambda": model.smear_lambda.item(),
        "init.backout_lambda": model.backout_lambda.item(),
        "param_groups.unembedding_lr": _defaults(GPT.param_groups)["unembedding_lr"],
        "param_groups.embedding_lr": _defaults(GPT.param_groups)["embedding_lr"],
        "param_groups.matrix_lr": _defaults(GPT.param_groups)["matrix_lr"],
        "param_groups.scalar_lr": _defaults(GPT.param_groups)["scalar_lr"],
        "param_groups.lm_head_betas": group_of[id(model.lm_head.weight)]["betas"],
        "param_groups.smear_lr": group_of[id(model.smear_gate.weight)]["lr"],
        "param_groups.adamw_eps": adamw_eps.pop(),
        "param_groups.muon_momentum": muon[0]["momentum"],
        "param_groups.muon_ns_steps": muon[0]["ns_steps"],
    }
    measured = {
        "init.wte_std": _std([model.transformer.wte.weight]),
        "init.lm_head_std": _std([model.lm_head.weight]),
        "init.qkv_std_x_sqrt_d": _std([w for b in blocks for w in (b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight)]) * d**0.5,
        "init.c_fc_std_x_sqrt_d": _std([b.mlp.c_fc.weight for b in blocks]) * d**0.5,
    }
    return {**{k: (v, 1e-6) for k, v in exact.items()}, **{k: (v, STATISTICAL) for k, v in measured.items()}}


def constants_table():
    """{constant: value} from the table under '## Constants' in docs/model.md."""
    text = (REPO / "docs" / "model.md").read_text()
    section = text.split("\n## Constants\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        key, value = cells[0].strip("`"), cells[1].strip("`")
        assert key not in table, f"{key} appears twice in the constants table"
        table[key] = ast.literal_eval(value)
    return table


def _close(doc, code, rel):
    if isinstance(doc, tuple) or isinstance(code, tuple):
        return isinstance(doc, tuple) and len(doc) == len(code) and all(_close(a, b, rel) for a, b in zip(doc, code))
    if isinstance(doc, str) or isinstance(code, str):
        return doc == code
    return math.isclose(doc, code, rel_tol=rel, abs_tol=1e-12)


def test_model_constants_table_matches_the_code():
    table, code = constants_table(), code_values()
    assert sorted(table) == sorted(code), (f"table rows without a check: {sorted(set(table) - set(code))}; "
                                           f"checked constants missing from the table: {sorted(set(code) - set(table))}")
    wrong = {k: (table[k], code[k][0]) for k in table if not _close(table[k], *code[k])}
    assert not wrong, f"docs/model.md disagrees with the code (doc, code): {wrong}"


def test_the_table_check_can_fail(monkeypatch):
    monkeypatch.setattr(gpt, "SOFTCAP", 20.0)
    code = code_values()
    assert not _close(constants_table()["SOFTCAP"], *code["SOFTCAP"])


# -----------------------------------------------------------------------------
# Links

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path):
    return FENCE.sub("", path.read_text())


def anchors(path):
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces -> hyphens."""
    out = set()
    for line in _prose(path).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if m:
            title = m.group(1).strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def relative_links(path):
    return [t for t in LINK.findall(_prose(path)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    assert doc.exists(), f"{doc.relative_to(REPO)} is missing"
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with this anchor)")
    assert not broken, f"{doc.relative_to(REPO)} has broken links: {broken}"


def test_link_checker_sees_links(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Top `x_y` (z)\n[ok](#top-x_y-z) [web](https://x.org) ![img](p.png)\n```\n[in code](nowhere.md)\n```\n")
    assert relative_links(doc) == ["#top-x_y-z", "p.png"]
    assert anchors(doc) == {"top-x_y-z"}
