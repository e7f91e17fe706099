"""Greedy decoding from the example MoE language model, every MoE layer on the low-latency ops.

Decodes text from the byte-level model of examples/train_moe.py: loads the parameters it saved
(`train_moe.py --save PATH`), or, without --params, trains that model briefly first. Attention
keeps a KV cache: one jitted prefill over the prompts, then one jitted step per token. Every MoE
layer runs jax_ep.nn.MoE.decode: jax_ep.low_latency.dispatch (FP8 by default) -> SwiGLU experts
as a batched matmul over the expert-major rows -> jax_ep.low_latency.combine. Every device JAX
sees is one EP rank (all local GPUs, or 8 virtual CPU devices without an accelerator); backend
"auto" is "cuda" on GPUs (the Buffers are sized), else the pure-JAX "xla" reference.

    python examples/train_moe.py --save runs/params.npz && \\
        python examples/decode_moe.py --params runs/params.npz
    python examples/decode_moe.py                     # no --params: trains 300 steps first
    python examples/decode_moe.py --prompt "def main(" --new-tokens 100 --bf16-dispatch

Prints the prompts with their continuations, the latency per decode step (median after the
warm-up steps) and tokens/s, and checks that the KV-cache tokens equal those of recomputing the
whole sequence without cache (same greedy tokens, logits within float rounding).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # jax_ep never uses NVLink multicast

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_moe as tm  # noqa: E402  (the model, data and training helpers)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402  (importable: train_moe put the checkout on sys.path if needed)

PROMPTS = ("def __init__(self, ", "import os\nimport ", "class ", "    for i in range(",
           "        raise ValueError(", "    return self.", 'if __name__ == "', "from . import ")


# ------------------------------------------------------------------------------ model


def init_cache(cfg: tm.ModelConfig, batch: int, mesh):
    """Per layer (k, v): [batch, seq_len, heads, head_dim] zeros in the compute dtype,
    replicated over the mesh."""
    shape = (batch, cfg.seq_len, cfg.n_heads, cfg.d_model // cfg.n_heads)

    def zeros():  # distinct arrays: the steps donate them
        return jax.device_put(jnp.zeros(shape, jnp.dtype(cfg.dtype)), NamedSharding(mesh, P()))

    return tuple((zeros(), zeros()) for _ in range(cfg.n_layers))


def cached_attention(attn: tm.Attention, x, k_cache, v_cache, start):
    """tm.Attention on new tokens x [B, s, d] at positions start .. start+s-1 with a KV cache
    [B, S, heads, head_dim]: their keys and values are written at those positions and the
    queries attend to cache positions <= their own. -> (out [B, s, d], k_cache, v_cache)."""
    b, s, d = x.shape
    h = attn.n_heads
    q, k, v = jnp.split(attn.qkv(x).reshape(b, s, 3, h, d // h), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [b, s, h, dh]
    k_cache = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
    v_cache = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k_cache, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(d // h)
    visible = jnp.arange(k_cache.shape[1])[None, :] <= (start + jnp.arange(s))[:, None]
    probs = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1).astype(attn.dtype)
    att = jnp.einsum("bhqk,bkhd->bqhd", probs, v_cache).reshape(b, s, d)
    return attn.out(att), k_cache, v_cache


def forward(model: tm.MoETransformer, tokens, moe_fn, cache=None, start=0):
    """tokens [B, s] at positions start .. start+s-1 -> (logits [B, s, VOCAB] float32, cache).

    As MoETransformer.__call__ with every MoE layer computed by moe_fn(moe, h). cache None:
    the model's own full causal attention (start must be 0; returns None for the cache)."""
    s = tokens.shape[1]
    pos = lax.dynamic_slice_in_dim(model.pos[...], start, s)
    x = (model.embed(tokens) + pos).astype(model.cfg.dtype)
    new_cache = []
    for layer, block in enumerate(model.blocks):
        h = block.norm1(x)
        if cache is None:
            x = x + block.attn(h)
        else:
            a, k_cache, v_cache = cached_attention(block.attn, h, *cache[layer], start)
            x = x + a
            new_cache.append((k_cache, v_cache))
        x = x + moe_fn(block.moe, block.norm2(x))
    logits = model.head(model.norm(x).astype(jnp.float32))
    return logits, (tuple(new_cache) if cache is not None else None)


def low_latency_moe(buffer: jax_ep.Buffer, use_fp8: bool):
    """moe_fn of `forward`: MoE.decode over `buffer` (its ll_max_tokens_per_rank fits the call)."""
    return lambda moe, h: moe.decode(h, use_fp8=use_fp8, buffer=buffer)


def ll_buffer(mesh, cfg: tm.ModelConfig, num_tokens: int, backend: str) -> jax_ep.Buffer:
    """A Buffer whose low-latency workspace takes num_tokens tokens per call (all ranks)."""
    return jax_ep.Buffer(mesh, "ep", backend=backend,
                         ll_max_tokens_per_rank=max(-(-num_tokens // mesh.size), 1),
                         hidden=cfg.d_model, num_topk=cfg.top_k)


# ------------------------------------------------------------------------------ decoding


def encode_prompts(prompts) -> np.ndarray:
    """[B, P] int32 bytes, shorter prompts left-padded with newlines (the corpus separates files
    with blank lines, so the model has seen them before code)."""
    data = [p.encode() for p in prompts]
    length = max(len(d) for d in data)
    return np.stack([np.frombuffer(b"\n" * (length - len(d)) + d, np.uint8)
                     for d in data]).astype(np.int32)


def generate(model: tm.MoETransformer, mesh, prompt_tokens, new_tokens: int, *,
             backend: str = "auto", use_fp8: bool = True, warmup: int = 2):
    """Greedy decoding with a KV cache: one jitted prefill of the prompts [B, P], then
    new_tokens - 1 jitted single-token steps. Every MoE layer through MoE.decode, over a Buffer
    sized for the prefill (B * P tokens) and one for the steps (B tokens).

    Returns dict(tokens [B, new_tokens] int32, logits [B, new_tokens, VOCAB] float32 (the
    distribution each token was taken from), prefill_s (incl. compilation), step_s [per step,
    the first ones include compilation], warmup, backend)."""
    cfg = model.cfg
    batch, plen = prompt_tokens.shape
    if plen + new_tokens > cfg.seq_len:
        raise ValueError(f"prompt ({plen}) + new tokens ({new_tokens}) exceed the model's "
                         f"context ({cfg.seq_len} positions)")
    graphdef, state = nnx.split(model)
    step_buffer = ll_buffer(mesh, cfg, batch, backend)
    prefill_moe = low_latency_moe(ll_buffer(mesh, cfg, batch * plen, backend), use_fp8)
    step_moe = low_latency_moe(step_buffer, use_fp8)

    def pick(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

    @functools.partial(jax.jit, donate_argnums=(2,))
    def prefill(state, tokens, cache):
        logits, cache = forward(nnx.merge(graphdef, state), tokens, prefill_moe, cache, 0)
        return (*pick(logits[:, -1]), cache)

    @functools.partial(jax.jit, donate_argnums=(2,))
    def step(state, token, cache, pos):
        logits, cache = forward(nnx.merge(graphdef, state), token[:, None], step_moe, cache, pos)
        return (*pick(logits[:, 0]), cache)

    replicated = NamedSharding(mesh, P())
    cache = init_cache(cfg, batch, mesh)
    t0 = time.perf_counter()
    token, logits, cache = prefill(state, jax.device_put(prompt_tokens, replicated), cache)
    token.block_until_ready()
    prefill_s = time.perf_counter() - t0
    tokens, all_logits, step_s = [token], [logits], []
    for i in range(new_tokens - 1):
        t0 = time.perf_counter()
        token, logits, cache = step(state, token, cache, np.int32(plen + i))
        token.block_until_ready()  # the next step needs it (and greedy decoding would check it)
        step_s.append(time.perf_counter() - t0)
        tokens.append(token)
        all_logits.append(logits)
    return dict(tokens=np.stack(jax.device_get(tokens), axis=1),
                logits=np.stack(jax.device_get(all_logits), axis=1), prefill_s=prefill_s,
                step_s=step_s, warmup=min(warmup, max(len(step_s) - 1, 0)),
                backend=step_buffer.backend)


def recompute(model: tm.MoETransformer, mesh, prompt_tokens, tokens, *, backend: str = "auto",
              use_fp8: bool = True):
    """The same greedy predictions without cache: one forward of the whole sequence (prompt +
    generated tokens but the last) through the model's own attention, MoE layers through
    MoE.decode. -> logits [B, new_tokens, VOCAB] at the positions that produced `tokens`."""
    seq = np.concatenate([prompt_tokens, tokens[:, :-1]], axis=1)
    moe_fn = low_latency_moe(ll_buffer(mesh, model.cfg, seq.size, backend), use_fp8)
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda state, seq: forward(nnx.merge(graphdef, state), seq, moe_fn)[0])
    logits = full(state, jax.device_put(seq, NamedSharding(mesh, P())))
    return np.asarray(logits[:, prompt_tokens.shape[1] - 1:])


def check_cache(out: dict, ref_logits) -> dict:
    """KV-cache vs full recompute: greedy tokens equal, logit differences."""
    ref_tokens = np.argmax(ref_logits, axis=-1)
    return dict(equal=int(np.sum(ref_tokens == out["tokens"])), total=int(ref_tokens.size),
                max_logit_diff=float(np.abs(ref_logits - out["logits"]).max()))


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default=None, metavar="PATH",
                   help="parameters saved by train_moe.py --save (default: train briefly)")
    p.add_argument("--train-steps", type=int, default=300,
                   help="without --params: training steps of train_moe.py's default model")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for a batch; default: 8 lines of Python)")
    p.add_argument("--new-tokens", type=int, default=64, help="bytes to generate per prompt")
    p.add_argument("--bf16-dispatch", action="store_true",
                   help="bfloat16 low-latency dispatch instead of FP8")
    p.add_argument("--warmup", type=int, default=2,
                   help="decode steps left out of the latency statistics (the first compiles)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--backend", choices=("auto", "xla", "cuda"), default="auto")
    p.add_argument("--no-check", action="store_true",
                   help="skip the KV cache vs full-recompute check")
    p.add_argument("--cpu-devices", type=int, default=8,
                   help="virtual CPU devices when there is no accelerator")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_briefly(mesh, backend: str, steps: int, dtype: str, seed: int = 0):
    """train_moe.py's default model trained for `steps` steps -> (model, summary string)."""
    cfg = tm.ModelConfig(dtype=dtype)
    batch = 16
    buffer = jax_ep.Buffer(mesh, "ep", backend=backend,
                           max_tokens_per_rank=-(-batch * cfg.seq_len // mesh.size),
                           hidden=cfg.d_model, num_topk=cfg.top_k)
    tx = tm.make_optimizer(3e-3, steps, 30)
    graphdef, state = tm.create_train_state(cfg, buffer, tx, seed)
    step = tm.make_train_step(graphdef, tx)
    train, _ = tm.load_corpus()
    rng = np.random.default_rng(seed)
    sharding = NamedSharding(mesh, P("ep"))
    losses, t0 = [], time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, jax.device_put(
            tm.sample_batch(train, rng, batch, cfg.seq_len), sharding))
        losses.append(float(metrics["loss"]))
        if (i + 1) % 100 == 0 or i + 1 == steps:
            print(f"  train step {i + 1}/{steps}: loss {losses[-1]:.3f}", flush=True)
    model = nnx.merge(graphdef, state.params, state.rest)
    tail = float(np.mean(losses[-10:])) if losses else float("nan")
    return model, (f"trained here: {steps} steps in {time.perf_counter() - t0:.0f} s, loss "
                   f"{losses[0] if losses else float('nan'):.3f} -> {tail:.3f}")


def printable(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tm.setup_devices(args.cpu_devices)
    devices = jax.devices()
    platform = devices[0].platform
    mesh = tm.make_mesh(devices)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if platform == "gpu"
                                                       else "float32")
    use_fp8 = not args.bf16_dispatch
    if args.params:
        layers = jax_ep.Buffer(mesh, "ep", backend="xla")  # the layers' own (unused) Buffer
        cfg, model = tm.load_params(args.params, layers, dtype=dtype)
        origin = f"loaded {args.params}"
    else:
        print(f"no --params: training train_moe.py's default model for {args.train_steps} "
              f"steps first", flush=True)
        model, origin = train_briefly(mesh, args.backend, args.train_steps, dtype, args.seed)
        cfg = model.cfg
    if use_fp8 and cfg.d_model % 128:
        raise SystemExit(f"FP8 dispatch needs d_model % 128 == 0 (got {cfg.d_model}): "
                         "pass --bf16-dispatch")
    if cfg.num_experts % len(devices):
        raise SystemExit(f"{cfg.num_experts} experts do not split over {len(devices)} devices")
    prompts = args.prompt or list(PROMPTS)
    prompt_tokens = encode_prompts(prompts)
    batch, plen = prompt_tokens.shape
    new_tokens = min(args.new_tokens, cfg.seq_len - plen)
    if new_tokens < 1:
        raise SystemExit(f"the prompts ({plen} bytes) fill the model's context ({cfg.seq_len})")
    print(f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.num_experts} experts "
          f"(top-{cfg.top_k}), context {cfg.seq_len}; {origin}")
    # float32 means float32 matmuls (GPUs' default is TF32): the KV cache check is then exact up
    # to float32 rounding; bfloat16 compute rounds cached and recomputed attention differently.
    exact = (jax.default_matmul_precision("highest") if dtype == "float32"
             else contextlib.nullcontext())
    with exact:
        out = generate(model, mesh, prompt_tokens, new_tokens, backend=args.backend,
                       use_fp8=use_fp8, warmup=args.warmup)
    print(f"devices: {len(devices)} x {platform} ({devices[0].device_kind}); backend "
          f"{out['backend']}; compute {dtype}; dispatch {'fp8' if use_fp8 else 'bf16'}")
    texts = [printable(bytes(row.astype(np.uint8).tolist())) for row in out["tokens"]]
    for i, prompt in enumerate(prompts):
        print(f"--- [{i}] {prompt!r} ->")
        print(prompt + texts[i])
    print("---")
    steps = np.asarray(out["step_s"][out["warmup"]:])
    summary = dict(batch=batch, prompt_len=plen, new_tokens=new_tokens,
                   backend=out["backend"], prefill_s=out["prefill_s"], text=texts)
    if steps.size:
        summary |= dict(step_ms_median=float(np.median(steps) * 1e3),
                        step_ms_p90=float(np.percentile(steps, 90) * 1e3),
                        tokens_per_s=float(batch * steps.size / steps.sum()))
        print(f"decode: {batch} sequence{'s' * (batch != 1)} x {new_tokens} tokens (prefill of {plen} + "
              f"{len(out['step_s'])} jitted steps); latency per step: median "
              f"{summary['step_ms_median']:.2f} ms, p90 {summary['step_ms_p90']:.2f} ms (over "
              f"{steps.size} steps after {out['warmup']} warm-up); {summary['tokens_per_s']:,.0f}"
              f" tokens/s ({summary['tokens_per_s'] / batch:,.1f} per sequence)")
    print(f"prefill: {batch} x {plen} tokens in {out['prefill_s']:.2f} s (incl. compilation); "
          f"first step {out['step_s'][0] if out['step_s'] else float('nan'):.2f} s "
          f"(incl. compilation)")
    if not args.no_check:
        with exact:
            ref_logits = recompute(model, mesh, prompt_tokens, out["tokens"],
                                   backend=args.backend, use_fp8=use_fp8)
        check = check_cache(out, ref_logits)
        summary["check"] = check
        verdict = ("OK" if check["equal"] == check["total"] else
                   "MISMATCH" if dtype == "float32" else
                   "differs by bfloat16 rounding of near-tied logits "
                   "(--dtype float32 checks exactly)")
        print(f"KV cache check: {check['equal']}/{check['total']} greedy tokens equal to "
              f"recomputing the full sequence without cache (max |logit diff| "
              f"{check['max_logit_diff']:.2e}): {verdict}")
    return summary


if __name__ == "__main__":
    main()
