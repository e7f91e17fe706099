#!/usr/bin/env python3
"""Throughput model of hierarchical (RDMA -> NVLink) dispatch/combine at N nodes x G GPUs.

    python benchmarks/internode_model.py [--nic-gbps 46] [--nvlink-gbps 282] [--out docs/...]

No GPU, no network: a model, not a measurement. It counts the bytes of DeepEP's normal-mode
workload (T tokens per GPU, hidden H, top-K of E experts, uniform routing, E spread evenly over
all GPUs) that must cross each link in the hierarchical scheme of issue 11, and divides them by
link rates:

- RDMA leg (dispatch): a token crosses the network once per *remote node* holding any of its K
  experts, to the GPU with the same local index there; expected remote nodes per token
  = (N - 1) * (1 - (1 - 1/N)^K).
- NVLink leg: on each node the token reaches, the GPU that got it (over RDMA, or the source on
  its own node) forwards it to every other GPU of that node holding one of its experts.
- Combine is the mirror (partial sums reduced inside the node before the network leg): the same
  counts, bf16 both ways.
- The legs overlap (chunked, pipelined), so time = max(RDMA, NVLink) + a fixed cost.

Inputs, with where they come from:
- nvlink-gbps: remote NVLink rate our intranode token dispatch reached, 281.8 GB/s per GPU
  (README, 2 x H200, EP2, measured 2026-12-01).
- nic-gbps: one 400 Gb/s ConnectX-7 per GPU, ~46 GB/s usable (DeepEP V1 reports 43-58 GB/s of
  "RDMA bandwidth" per NIC at EP16-64 on such NICs; nothing measured here: no NIC on our hosts).
- fixed-us: per-call fixed cost; 60 us (our EP1 normal kernels measured 56.9 / 33.8 us at 128
  tokens; an RDMA round trip adds a few us).

DeepEP's published internode normal kernels (H800, CX7 400 Gb/s, 4096 tokens, hidden 7168,
top-8 of 256, bf16 combine / FP8 dispatch), "RDMA GB/s" = RDMA bytes / time:
EP16 dispatch 43 / combine 43, EP32 58 / 57, EP64 51 / 50.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEEPEP = {16: (43, 43), 32: (58, 57), 64: (51, 50)}  # EP: (dispatch, combine) RDMA GB/s


def expected_distinct(groups: int, k: int) -> float:
    """Expected distinct groups hit by k uniform draws over `groups` equal groups (with
    replacement: top-k experts are distinct, but over 256 experts the difference is < 1%)."""
    return groups * (1.0 - (1.0 - 1.0 / groups) ** k)


def model(nodes, gpus, tokens, topk, row_bytes, nic, nvlink, fixed_us):
    """Per GPU and call: bytes and time of each leg (us), uniform routing."""
    remote_nodes = (nodes - 1) * (1.0 - (1.0 - 1.0 / nodes) ** topk)
    # NVLink sends per token: every GPU holding one of its experts, except on each node the GPU
    # with the source's local index (it got the token over RDMA, or is the source itself):
    # D (1 - 1/G), D = expected distinct GPUs hit.
    gpus_hit = expected_distinct(nodes * gpus, topk)
    nvlink_sends = gpus_hit * (1.0 - 1.0 / gpus)
    rdma_bytes = tokens * remote_nodes * row_bytes
    nvlink_bytes = tokens * nvlink_sends * row_bytes
    t_rdma = rdma_bytes / (nic * 1e3)  # GB/s -> bytes per us
    t_nvl = nvlink_bytes / (nvlink * 1e3)
    t = max(t_rdma, t_nvl) + fixed_us
    return dict(remote_nodes=remote_nodes, nvlink_sends=nvlink_sends, rdma_mb=rdma_bytes / 1e6,
                nvlink_mb=nvlink_bytes / 1e6, t_rdma=t_rdma, t_nvl=t_nvl, t=t,
                rdma_gbps=rdma_bytes / t / 1e3, bound="RDMA" if t_rdma >= t_nvl else "NVLink")


def table(args):
    lines = ["| EP (nodes x 8) | remote nodes / token | RDMA MB / GPU | NVLink MB / GPU | "
             "RDMA us | NVLink us | dispatch us (bf16) | RDMA GB/s | dispatch us (FP8) | "
             "DeepEP RDMA GB/s (disp / comb) |", "|" + "---|" * 10]
    for nodes in (2, 4, 8, 16):
        bf16 = model(nodes, 8, args.tokens, args.topk, 2 * args.hidden, args.nic_gbps,
                     args.nvlink_gbps, args.fixed_us)
        fp8 = model(nodes, 8, args.tokens, args.topk, args.hidden + args.hidden // 128 * 4,
                    args.nic_gbps, args.nvlink_gbps, args.fixed_us)
        ep = nodes * 8
        ref = DEEPEP.get(ep)
        lines.append(
            f"| {ep} ({nodes} x 8) | {bf16['remote_nodes']:.2f} | {bf16['rdma_mb']:.1f} | "
            f"{bf16['nvlink_mb']:.1f} | {bf16['t_rdma']:.0f} | {bf16['t_nvl']:.0f} | "
            f"{bf16['t']:.0f} ({bf16['bound']}) | {bf16['rdma_gbps']:.1f} | {fp8['t']:.0f} | "
            f"{'%d / %d' % ref if ref else '-'} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--nic-gbps", type=float, default=46.0)
    p.add_argument("--nvlink-gbps", type=float, default=281.8)
    p.add_argument("--fixed-us", type=float, default=60.0)
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args()
    text = table(args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
