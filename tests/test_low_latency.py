"""Low-latency (decode) ops: jax_ep.low_latency against a numpy model of the contract.

Runs on CPU (backend "xla", 1-8 virtual devices) and on GPUs (env JAX_EP_TEST_BACKEND, default
"auto" = the CUDA kernels over every local GPU). Tolerances:
- dispatch (rows, FP8 bytes and scales, counts, ranges, sources, handle): bit-exact on both
  backends; rows past recv_count are unspecified on "cuda" and not compared.
- combine: the CUDA kernels equal the numpy model bitwise (explicit float32 roundings in the same
  order); backend "xla" within 1 bfloat16 ulp of it (XLA may contract a * b + c into an FMA).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_ep
import ll_model
from conftest import ep_devices, make_mesh
from jax_ep import low_latency as ll

BF16 = ll_model.BF16


def _backend():
    return os.environ.get("JAX_EP_TEST_BACKEND", "auto")


def _buffer(mesh, m, h, k, backend=None):
    return jax_ep.Buffer(mesh, "ep", backend=backend or _backend(), ll_max_tokens_per_rank=m,
                         hidden=h, num_topk=k)


# ---------------------------------------------------------------- running the ops


def _ll_program(buf, mesh, num_experts, fp8, split):
    """One jitted program over the mesh (ll_model.program): f(x, idx, w, failed)."""
    body = ll_model.program(buf, num_experts, fp8, split)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep"), P()),
                                 out_specs=(P("ep"), P("ep"), P("ep"))))


def _run_ll(f, mesh, x, idx, w, failed):
    """f (see _ll_program) on [R, T, ...] inputs; per-rank numpy outputs."""
    r_, t_ = idx.shape[:2]
    rows = lambda a: jnp.asarray(a.reshape(r_ * t_, -1))  # noqa: E731
    out, comb, missing = f(rows(x), rows(idx), rows(w), jnp.asarray(failed, jnp.int32))
    out = {k: np.asarray(v) for k, v in out.items()}
    return out, np.asarray(comb).reshape(r_, t_, -1), np.asarray(missing).reshape(r_, t_)


def _check(buf, mesh, rng, t_, h, k_, num_experts, m, fp8, kind, failed=None, split=False,
           program=None):
    """Fresh inputs through `program` (default: a new _ll_program) against the numpy model."""
    r_ = mesh.shape["ep"]
    failed = np.zeros(r_, bool) if failed is None else np.asarray(failed, bool)
    x = rng.standard_normal((r_, t_, h)).astype(np.float32) * rng.uniform(0.01, 30.0, (r_, t_, 1))
    x = x.astype(BF16)
    idx, w = ll_model.routing(rng, r_, t_, k_, num_experts, kind)
    f = program or _ll_program(buf, mesh, num_experts, fp8, split)
    got, comb, missing = _run_ll(f, mesh, x, idx, w, failed)
    want = ll_model.np_dispatch(x, idx, w, num_experts, m, fp8, failed)
    for d in range(r_):
        ll_model.assert_dispatch_rank({k: v[d] for k, v in got.items()}, want[d], fp8,
                                      f"rank {d}")
    want_out, want_missing = ll_model.np_combine(got["y"], want, idx, num_experts, failed)
    np.testing.assert_array_equal(missing, want_missing)
    ll_model.assert_combine(comb, want_out, buf.backend == "cuda", "combine")
    return got, want


CASES = [  # (ranks, T, H, K, E, M, fp8, routing)
    (1, 7, 256, 3, 6, 9, True, "uniform"),
    (1, 16, 136, 4, 8, 16, False, "messy"),
    (2, 5, 384, 2, 4, 5, True, "skewed"),
    (2, 11, 128, 8, 18, 13, True, "messy"),
    (4, 9, 264, 3, 12, 9, False, "uniform"),
    (4, 6, 256, 5, 8, 6, True, "messy"),
    (8, 3, 128, 8, 24, 4, True, "uniform"),
    (8, 4, 200, 2, 16, 4, False, "skewed"),
    (1, 5, 1160, 4, 8, 6, False, "messy"),    # 2 whole combine chunks + 136 channels
    (2, 6, 1408, 3, 8, 7, True, "skewed"),    # 2 whole chunks + a chunk's last piece half used
]


def _mesh_for(r_):
    if len(ep_devices()) < r_:
        pytest.skip(f"needs {r_} devices")
    return make_mesh(r_)


@pytest.mark.parametrize("case", CASES, ids=[f"R{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-E{c[4]}-M{c[5]}-"
                                             f"{'fp8' if c[6] else 'bf16'}-{c[7]}" for c in CASES])
def test_ll_matches_numpy_model(case, rng):
    r_, t_, h, k_, e, m, fp8, kind = case
    mesh = _mesh_for(r_)
    with _buffer(mesh, m, h, k_) as buf:
        got, want = _check(buf, mesh, rng, t_, h, k_, e, m, fp8, kind)
    if kind == "messy" and r_ == 1:
        assert sum(int(w["num_dropped"]) for w in want) > 0, "the case must overflow R * M"


def test_ll_send_recv_split_equals_fused(rng):
    r_ = min(len(ep_devices()), 4)
    mesh = make_mesh(r_)
    with _buffer(mesh, 8, 256, 4) as buf:
        for fp8 in (True, False):
            _check(buf, mesh, rng, 8, 256, 4, 4 * r_, 8, fp8, "uniform", split=True)


@pytest.mark.gpu
def test_ll_deepep_decode_config(rng):
    """DeepEP's low-latency test shape: 128 tokens per rank, hidden 7168, top-8 of 288 experts
    (GPU only: [288, R * 128, 7168] receive buffers)."""
    mesh = make_mesh(len(ep_devices()))
    with _buffer(mesh, 128, 7168, 8) as buf:
        _check(buf, mesh, rng, 128, 7168, 8, 288, 128, True, "uniform")


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_ll_failed_rank_is_skipped_and_reported(num_ranks, rng):
    """A rank marked failed (the same mask on every rank) takes no part: tokens for its experts
    come back missing (num_missing), the rest complete."""
    mesh = _mesh_for(num_ranks)
    failed = np.zeros(num_ranks, bool)
    failed[num_ranks - 1] = True
    with _buffer(mesh, 6, 128, 3) as buf:
        _, want = _check(buf, mesh, rng, 6, 128, 3, 2 * num_ranks, 6, True, "uniform",
                         failed=failed)
    assert int(want[-1]["recv_count"].sum()) == 0


def test_ll_back_to_back_and_two_in_flight(rng):
    """Many calls in one program (the device generation and both parities cycle), two
    dispatches in flight at once, received first in order and then in reverse order (forced
    with tie), each equal to its own model."""
    r_ = min(len(ep_devices()), 2)
    mesh = make_mesh(r_)
    t_, h, k_, e, m, steps = 6, 128, 2, 2 * r_, 6, 5
    with _buffer(mesh, m, h, k_) as buf:
        def pair(x0, x1, idx, w, reverse):
            a = ll.dispatch_send(buf, x0, idx, w, num_experts=e)
            a, x1 = ll.tie(a, x1)
            b = ll.dispatch_send(buf, x1, idx, w, num_experts=e)
            a, b = ll.tie(a, b)  # both sends precede both receives
            if reverse:
                rb = ll.dispatch_recv(buf, b)
                a, _ = ll.tie(a, rb.recv_x)  # ... and b is received before a
                ra = ll.dispatch_recv(buf, a)
            else:
                ra = ll.dispatch_recv(buf, a)
                b, _ = ll.tie(b, ra.recv_x)
                rb = ll.dispatch_recv(buf, b)
            return [ra.recv_x.astype(jnp.float32), rb.recv_x.astype(jnp.float32)]

        def body(xs, idx, w):
            def step(carry, xi):
                # XLA orders side-effecting calls only by data: each pair's sends wait for the
                # previous pair's receives (else a third send could find a busy parity), across
                # iterations through the carry (the contract, should XLA unroll the loop).
                xi, _ = lax.optimization_barrier((xi, carry))
                # Each send's rows computed from its slice (as a decoder's are computed), never a
                # plain slice: XLA:GPU's dynamic-slice fusion clones a custom call whose operand
                # is a slice and keeps the side-effecting original as well (seen in the compiled
                # program on jax 0.11.2: five sends per step), so that send would run twice.
                xs4 = [(xi[j].astype(jnp.float32) * 2).astype(BF16) for j in range(4)]
                first = pair(xs4[0], xs4[1], idx, w, False)
                x2, x3, _ = lax.optimization_barrier((xs4[2], xs4[3], first))
                second = pair(x2, x3, idx, w, True)
                return second[1][0, 0, 0], jnp.stack(first + second)
            _, out = jax.lax.scan(step, w[0, 0] * 0, xs)  # carry varies over "ep" as its update
            return out[None]

        xs = rng.standard_normal((steps, 4, r_ * t_, h)).astype(BF16)
        idx, w = ll_model.routing(rng, r_, t_, k_, e, "uniform")
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, None, "ep"), P("ep"), P("ep")),
                                  out_specs=P("ep")))
        got = np.asarray(f(jnp.asarray(xs), jnp.asarray(idx.reshape(r_ * t_, k_)),
                           jnp.asarray(w.reshape(r_ * t_, k_))))
        for i in range(steps):
            for j in range(4):
                x2 = (xs[i, j].astype(np.float32) * 2).astype(BF16)  # exact
                want = ll_model.np_dispatch(x2.reshape(r_, t_, h), idx, w, e, m, True,
                                            np.zeros(r_, bool))
                for d in range(r_):
                    c = want[d]["recv_count"]
                    rows = want[d]["recv_x"].astype(np.float32)
                    for x_ in range(c.shape[0]):
                        np.testing.assert_array_equal(got[d, i, j, x_, :c[x_]], rows[x_, :c[x_]],
                                                      err_msg=f"step {i} call {j} rank {d}")


def test_ll_has_no_gradient():
    mesh = make_mesh(1)
    with _buffer(mesh, 4, 128, 2, backend="xla") as buf:
        def loss(x, idx, w):
            res = ll.dispatch(buf, x, idx, w, num_experts=2, use_fp8=False)
            return res.recv_x.astype(jnp.float32).sum()

        f = jax.shard_map(loss, mesh=mesh, in_specs=P("ep"), out_specs=P(), check_vma=False)
        x = jnp.ones((4, 128), jnp.bfloat16)
        idx = jnp.zeros((4, 2), jnp.int32)
        with pytest.raises(NotImplementedError, match="no gradient"):
            jax.grad(f)(x, idx, jnp.ones((4, 2), jnp.float32))


def test_ll_argument_errors():
    mesh = make_mesh(1)
    x = jnp.ones((4, 128), jnp.bfloat16)
    idx = jnp.zeros((4, 2), jnp.int32)
    w = jnp.ones((4, 2), jnp.float32)

    def call(buf, x=x, idx=idx, w=w, **kw):
        f = jax.shard_map(lambda x, i, w: ll.dispatch(buf, x, i, w, **kw).recv_count, mesh=mesh,
                          in_specs=P("ep"), out_specs=P("ep"))
        return f(x, idx, w)

    with jax_ep.Buffer(mesh, "ep", backend="xla") as plain:
        with pytest.raises(ValueError, match="ll_max_tokens_per_rank"):
            call(plain, num_experts=2)
    with _buffer(mesh, 4, 128, 2, backend="xla") as buf:
        with pytest.raises(ValueError, match="exceed"):
            call(buf, x=jnp.ones((5, 128), jnp.bfloat16), idx=jnp.zeros((5, 2), jnp.int32),
                 w=jnp.ones((5, 2), jnp.float32), num_experts=2)
        with pytest.raises(ValueError, match="multiple of 128"):
            call(buf, x=jnp.ones((4, 136), jnp.bfloat16), num_experts=2)
        with pytest.raises(TypeError, match="bfloat16"):
            call(buf, x=jnp.ones((4, 128), jnp.float32), num_experts=2)
        with pytest.raises(TypeError, match="num_experts"):
            call(buf, num_experts=None)
        with pytest.raises(TypeError, match="num_experts"):
            call(buf, num_experts=2.0)
        # numpy integers are integers (as in jax_ep.dispatch)
        np.testing.assert_array_equal(call(buf, num_experts=np.int64(2)), call(buf, num_experts=2))
        with pytest.raises(ValueError, match="failed_ranks"):
            call(buf, num_experts=2, failed_ranks=jnp.zeros((3,), jnp.int32))


def test_ll_lowers_to_custom_calls():
    """Backend "cuda" (traced on any machine): send and receive are separate side-effecting
    custom calls, so XLA may schedule work between them but never merges or drops one."""
    import re

    from jax_ep import _ffi
    from jax_ep.backends import cuda_ll
    from jax_ep.types import LowLatencyConfig

    if not _ffi.HAS_CUDA_EXTENSION and os.environ.get("JAX_EP_REQUIRE_CUDA_EXT") != "1":
        pytest.skip("CUDA extension not built")
    r_, t_, h, k_, e, m = 4, 8, 256, 2, 8, 8
    mesh = make_mesh(r_)
    cfg = LowLatencyConfig(axis_name="ep", backend="cuda", num_ranks=r_, num_experts=e,
                           num_tokens=t_, hidden=h, num_topk=k_, max_tokens=m, use_fp8=True,
                           workspace_id=1)

    def body(x, idx, w):
        failed = jnp.zeros((r_,), jnp.int32)
        res = cuda_ll.dispatch_recv(cfg, cuda_ll.dispatch_send(cfg, x, idx, w, failed))
        y = res.recv_x.astype(jnp.bfloat16)
        return cuda_ll.combine_recv(cfg, cuda_ll.combine_send(cfg, y, res.handle, failed)).out

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    args = (jnp.ones((r_ * t_, h), jnp.bfloat16), jnp.zeros((r_ * t_, k_), jnp.int32),
            jnp.ones((r_ * t_, k_), jnp.float32))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"@(jax_ep_ll_\w+)\(", text)
    assert calls == ["jax_ep_ll_dispatch_send", "jax_ep_ll_dispatch_recv",
                     "jax_ep_ll_combine_send", "jax_ep_ll_combine_recv"], calls
    assert text.count("has_side_effect = true") >= 4

    def fused(x, idx, w):  # the unsplit ops: one custom call each
        failed = jnp.zeros((r_,), jnp.int32)
        res = cuda_ll.dispatch(cfg, x, idx, w, failed)
        return cuda_ll.combine(cfg, res.recv_x.astype(jnp.bfloat16), res.handle, failed).out

    f = jax.jit(jax.shard_map(fused, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"@(jax_ep_ll_\w+)\(", text) == ["jax_ep_ll_dispatch", "jax_ep_ll_combine"]


# ---------------------------------------------------------------- GPU only

gpu = pytest.mark.gpu


def _cuda_buffer_or_skip(mesh, m, h, k):
    buf = _buffer(mesh, m, h, k)
    if buf.backend != "cuda":
        buf.close()
        pytest.skip("needs backend 'cuda'")
    return buf


@gpu
def test_ll_compute_sits_between_send_and_recv():
    """The compiled program runs the matmul after dispatch_send and before dispatch_recv."""
    mesh = make_mesh(1)
    with _cuda_buffer_or_skip(mesh, 16, 512, 4) as buf:
        def body(x, idx, w, a):
            pending = ll.dispatch_send(buf, x, idx, w, num_experts=8)
            pending, a = ll.tie(pending, a)
            z = jnp.tanh(a @ a)
            pending, z = ll.tie(pending, z)
            res = ll.dispatch_recv(buf, pending)
            return res.recv_count, z

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P()))
        args = (jnp.ones((16, 512), jnp.bfloat16), jnp.zeros((16, 4), jnp.int32),
                jnp.ones((16, 4), jnp.float32), jnp.ones((1024, 1024), jnp.float32))
        text = f.lower(*args).compile().as_text()
        entry = text[text.index("ENTRY"):]
        send = entry.index("jax_ep_ll_dispatch_send")
        recv = entry.index("jax_ep_ll_dispatch_recv")
        gemm = min(i for i in (entry.find("__cublas$gemm"),
                               entry.find("custom_call_target=\"__cublas"), entry.find(" dot("))
                   if i >= 0)
        assert send < gemm < recv, entry[:4000]
        count, _ = f(*args)
        assert int(count.sum()) == 16


MISUSE_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, sys
from jax.sharding import Mesh, PartitionSpec as P
import jax_ep
from jax_ep import low_latency as ll
from jax_ep.types import LowLatencyPending
mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
buf = jax_ep.Buffer(mesh, "ep", backend="cuda", ll_max_tokens_per_rank=8, hidden=128, num_topk=2,
                    timeout_s=5)
x = jnp.ones((8, 128), jnp.bfloat16); idx = jnp.zeros((8, 2), jnp.int32)
w = jnp.ones((8, 2), jnp.float32)
mode = sys.argv[1]
def body(x, idx, w):
    if mode == "recv_without_send":
        p = ll.dispatch_send(buf, x, idx, w, num_experts=2)
        fake = LowLatencyPending(p.config, p.ticket + jnp.array([2, 0], jnp.int32),
                                 p.failed_ranks, p.handle, p.blocks)
        return ll.dispatch_recv(buf, fake).recv_count
    a = ll.dispatch_send(buf, x, idx, w, num_experts=2)
    a, x2 = ll.tie(a, x * 2)
    b = ll.dispatch_send(buf, x2, idx, w, num_experts=2)
    b, x3 = ll.tie(b, x * 3)
    c = ll.dispatch_send(buf, x3, idx, w, num_experts=2)  # parity of `a`, not yet received
    return ll.dispatch_recv(buf, c).recv_count + ll.dispatch_recv(buf, b).recv_count
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P()))
try:
    print("RESULT", f(x, idx, w).block_until_ready())
except Exception as e:
    print("RAISED", type(e).__name__, str(e)[:300])
try:
    buf.check()
except RuntimeError as e:
    print("CHECK", e)
"""


@gpu
@pytest.mark.parametrize("mode,message", [
    ("recv_without_send", "receive without its send"),
    ("three_in_flight", "previous send on this buffer parity was not received"),
])
def test_ll_misuse_is_an_error_not_a_hang(mode, message):
    proc = subprocess.run([sys.executable, "-c", MISUSE_SCRIPT, mode], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    text = proc.stdout + proc.stderr
    assert message in text, text[-3000:]


GRAPH_SCRIPT = r"""
import os, sys
tests, benchmarks, mode, seed = sys.argv[1:5]
sys.path[:0] = [tests, benchmarks]
from graph_flags import GRAPH_FLAGS  # imports nothing: jax is not yet started
# "stream": command buffers off, every kernel launched directly (the control)
flags = GRAPH_FLAGS if mode == "graph" else "--xla_gpu_enable_command_buffer="
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
import numpy as np
import test_low_latency as t  # its conftest configures jax first
import profile_ll
from conftest import ep_devices, make_mesh
mesh = make_mesh(len(ep_devices()))
rng = np.random.default_rng(int(seed))
r_, t_, h, k_, m = mesh.size, 11, 1408, 4, 12  # H: 2 whole combine chunks + part
with t._buffer(mesh, m, h, k_) as buf:
    assert buf.backend == "cuda", buf
    for fp8, split in ((True, False), (True, True), (False, True)):
        f = t._ll_program(buf, mesh, 3 * r_, fp8, split)
        def check(gen):  # inputs drawn from gen, the same executable
            t._check(buf, mesh, gen, t_, h, k_, 3 * r_, m, fp8, "messy", split=split, program=f)
        for _ in range(2):  # compile; record the graphs
            check(rng)
        # fresh inputs, then the same inputs again (a replay need not call the handlers)
        same, fresh = int(rng.integers(1 << 30)), iter([1, 0, 0, 1, 0, 0])
        per, in_graph, apis, _ = profile_ll.profile_kernels(
            lambda: check(rng if next(fresh) else np.random.default_rng(same)), (), 6)
        for name, durations in per.items():
            if profile_ll.is_ours(name):
                print(f"KERNEL\tfp8={fp8}\tsplit={split}\t{in_graph[name]}/{len(durations)}\t"
                      f"{name}\t{sorted(apis[name])}")
print("DONE")
"""


def _graph_script_kernels(mode, seed):
    """Runs GRAPH_SCRIPT in a fresh process, its XLA_FLAGS with command buffers off (mode
    "stream") or bench_low_latency.py's graph flags ("graph"): {(fp8, split, kernel name):
    (launches not made by a recorded kernel-launch call, launches)} of the jax_ep kernels."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", GRAPH_SCRIPT, here,
                           os.path.join(os.path.dirname(here), "benchmarks"), mode, str(seed)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "DONE" in proc.stdout, f"{mode} seed {seed}\n" + text[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("KERNEL")]
    print(f"mode {mode}\n" + "\n".join(lines))
    kernels = {}
    for line in lines:
        _, fp8, split, counts, name, _ = line.split("\t")
        kernels[fp8, split, name] = tuple(map(int, counts.split("/")))
    assert len({k[:2] for k in kernels}) == 3, text[-4000:]  # every program profiled
    return kernels


@gpu
def test_ll_replays_in_xla_cuda_graphs():
    """With XLA's command buffers on for custom calls (the flags of bench_low_latency.py's graph
    mode), no launch of a jax_ep LL kernel comes from a recorded kernel-launch call (CUPTI through
    torch.profiler correlates each kernel with its host call): a CUDA graph launch made them. The
    control, the same script with command buffers off, must show every launch of the same
    kernels made by a recorded launch call (our handlers' <<<>>>), so the correlation is proven to
    see them. Calls of one executable on fresh inputs, the generation and parity advancing on the
    device, all equal the numpy model bit for bit in both runs (fused and split, FP8 and
    bfloat16, messy routing with overflow)."""
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch (CUPTI through torch.profiler)")
    seed = int.from_bytes(os.urandom(3), "little")
    stream = _graph_script_kernels("stream", seed)
    graph = _graph_script_kernels("graph", seed)
    assert stream.keys() == graph.keys(), (sorted(stream), sorted(graph))
    for k, (not_direct, launches) in stream.items():
        assert launches > 0 and not_direct == 0, ("stream", k, not_direct, launches)
        assert graph[k] == (launches, launches), ("graph", k, graph[k], launches)


def test_fp8_inverse_scale_is_correctly_rounded(rng):
    """fp8_cast's 448 / amax equals IEEE (round-to-nearest) float32 division bit for bit, like
    the kernels' __fdiv_rn; XLA:GPU's own float32 division (div.full.f32) is not exact."""
    from jax_ep.backends.xla_ll import _div_rn_448
    lo, hi = np.array([1e-4, 3.3e38], np.float32).view(np.uint32)
    exps = np.arange(113, 255, dtype=np.uint32) << 23  # powers of two, all-ones mantissas
    bits = np.concatenate([rng.integers(lo, hi, 200_000, np.uint32, endpoint=True),
                           [lo, hi], exps, exps | 0x7FFFFF, exps | 0x600000])
    amax = bits.view(np.float32)
    got = np.asarray(jax.jit(_div_rn_448)(jnp.asarray(amax)))
    np.testing.assert_array_equal(got.view(np.uint32), (np.float32(448) / amax).view(np.uint32))
