"""examples/train_moe.py: a couple of training steps of a tiny configuration."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import make_mesh

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_moe.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_moe_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_corpus_split(example):
    train, val = example.load_corpus()
    assert train.dtype == np.uint8 and len(train) > 10 * len(val) > 0


@pytest.mark.parametrize("num_ranks,kw", [
    (4, dict()),
    (8, dict(scoring="sigmoid", n_group=4, topk_group=2, score_bias=True, num_shared_experts=1,
             capacity_factor=None)),
], ids=["softmax-r4", "sigmoid-grouped-bias-shared-r8"])
def test_two_train_steps(example, num_ranks, kw):
    mesh = make_mesh(num_ranks)
    cfg = example.ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16, d_ff=32,
                              num_experts=8, top_k=2, **kw)
    buffer = jax_ep.Buffer(mesh, "ep", backend="xla")
    tx = example.make_optimizer(1e-3, steps=2, warmup=1)
    graphdef, state = example.create_train_state(cfg, buffer, tx, seed=0)
    step = example.make_train_step(graphdef, tx, aux_coef=0.01,
                                   bias_rate=1e-3 if cfg.score_bias else 0.0)
    train, _ = example.load_corpus()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):
        batch = example.sample_batch(train, rng, 2 * num_ranks, cfg.seq_len)
        state, metrics = step(state, jax.device_put(batch, NamedSharding(mesh, P("ep"))))
        losses.append(float(metrics["loss"]))
        assert math.isfinite(float(metrics["aux_loss"]))
        assert np.asarray(metrics["counts"]).sum() == 2 * num_ranks * cfg.seq_len * 2
    assert all(math.isfinite(v) for v in losses)
    assert 4.0 < losses[0] < 7.0  # ~ln(256) at initialisation
    if cfg.score_bias:
        biases = [v for v in jax.tree.leaves(state.rest)]
        assert any(float(np.abs(np.asarray(b)).max()) > 0 for b in biases)


def test_main_writes_outputs(example, tmp_path):
    n = len(jax.devices())
    if n < 2 or 8 % n:
        pytest.skip(f"needs a device count dividing 8, have {n}")
    summary = example.main([
        "--steps", "2", "--batch", "8", "--seq-len", "16", "--d-model", "32", "--layers", "1",
        "--heads", "2", "--d-ff", "32", "--experts", "8", "--eval-batches", "1",
        "--backend", "xla", "--out", str(tmp_path), "--save", str(tmp_path / "params.npz")])
    assert math.isfinite(summary["start_loss"]) and math.isfinite(summary["end_loss"])
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["step"] == [1, 2] and len(history["eval_loss"]) == 2
    assert (tmp_path / "loss.png").stat().st_size > 0
    with np.load(tmp_path / "params.npz") as saved:  # for examples/decode_moe.py --params
        assert json.loads(str(saved["__config__"]))["d_model"] == 32
        assert saved["blocks/0/moe/w_gate"].shape == (8, 32, 32)


def test_main_reports_dropped_rows_as_run_total(example, tmp_path, capsys):
    """The final report says the dropped rows are the run's total (a share of the routed rows),
    and history.json keeps them per step (the middle panel of loss.png)."""
    n = len(jax.devices())
    if n < 2 or 8 % n:
        pytest.skip(f"needs a device count dividing 8, have {n}")
    summary = example.main([
        "--steps", "2", "--batch", "8", "--seq-len", "16", "--d-model", "32", "--layers", "1",
        "--heads", "2", "--d-ff", "32", "--experts", "8", "--eval-batches", "1",
        "--capacity-factor", "0.5", "--backend", "xla", "--out", str(tmp_path)])
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["dropped"]) == 2
    assert summary["total_dropped"] == sum(history["dropped"]) > 0  # factor 0.5 must drop
    assert summary["routed_rows"] == 2 * 8 * 16 * 2 * 1  # steps * tokens * top_k * layers
    out = capsys.readouterr().out
    assert f"dropped rows: {summary['total_dropped']:,} in total over 2 steps" in out, out
    assert "0 = none lost" in out
