"""examples/decode_moe.py: KV-cache greedy decoding through MoE.decode on a tiny saved model."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import jax_ep

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture(scope="module")
def decode_example():
    spec = importlib.util.spec_from_file_location("decode_moe_example",
                                                  os.path.join(EXAMPLES, "decode_moe.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # imports examples/train_moe.py as train_moe
    return module


def test_decode_saved_model_kv_cache_matches_recompute(decode_example, tmp_path, capsys):
    """train_moe.save_params -> decode_moe.main(--params): 3 prompts of different lengths (left
    padded; 3 tokens per step on 8 ranks: decode pads), 2 layers (one cache each), FP8
    dispatch, float32 compute (GPUs default to bfloat16; float32 matmuls then run at full
    precision, not TF32). Its check recomputes the whole sequence without cache: the greedy
    tokens must be equal, the logits equal to float32 rounding (~1e-6) except where such a
    difference flips one FP8 rounding of an MoE input (~1e-4 on logits of ~1)."""
    tm = decode_example.tm
    n = len(jax.devices())
    if 8 % n:
        pytest.skip(f"needs a device count dividing 8, have {n}")
    cfg = tm.ModelConfig(d_model=128, n_layers=2, n_heads=2, seq_len=24, d_ff=64,
                         num_experts=8, top_k=2)
    mesh = tm.make_mesh()
    model = tm.MoETransformer(cfg, jax_ep.Buffer(mesh, "ep", backend="xla"), nnx.Rngs(3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    path = str(tmp_path / "params.npz")
    tm.save_params(path, cfg, graphdef, tm.TrainState(params, rest, None))
    # The round trip restores every array (expert weights sharded over the mesh again).
    _, loaded = tm.load_params(path, jax_ep.Buffer(mesh, "ep", backend="xla"))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.blocks[0].moe.w_gate[...].sharding.spec[0] == "ep"

    summary = decode_example.main(["--params", path, "--prompt", "def ", "--prompt",
                                   "import os", "--prompt", "x", "--new-tokens", "8",
                                   "--backend", "xla", "--dtype", "float32"])
    printed = capsys.readouterr().out
    check = summary["check"]
    assert check["equal"] == check["total"] == 3 * 8, check
    assert check["max_logit_diff"] < 1e-2, check
    assert summary["new_tokens"] == 8 and len(summary["text"]) == 3
    assert math.isfinite(summary["tokens_per_s"]) and summary["step_ms_median"] > 0
    assert "KV cache check: 24/24" in printed and "tokens/s" in printed
    assert "--- [1] 'import os' ->" in printed
