// Internode kernels (see internode.h): the shared dispatch and return kernels instantiated with
// NvshmemNet, the broadcast of combine's VJP, their launchers and preloading.
#include "../intranode/dispatch_kernel.cuh"
#include "../intranode/return_kernel.cuh"
#include "internode.h"
#include "net.cuh"

namespace jax_ep {
namespace {

using dispatch_kernel::DispatchKernel;
using return_kernel::ReturnKernel;

// Broadcast (combine's VJP): values [T] -> rows [C] along the dispatch's path. Every block pushes
// its tokens (the ranks of my node: their staging slots; other nodes: one message each, to the
// rank with my local index), forwards the messages it got (slots from the handle), then fills
// its receive rows as their slots land (per-slot flags: forwarded slots land independently).
template <typename V>
__global__ void __launch_bounds__(kThreads, 1) BroadcastKernel(CommArgs c, BroadcastArgs a,
                                                               NodeComm n) {
  using Net = NvshmemNet;
  const int lane = threadIdx.x % 32;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  const int num_ranks = c.num_ranks, rank = c.rank, per_node = n.ranks_per_node;
  const int my_node = rank / per_node, local = rank % per_node, num_nodes = n.num_nodes;
  const size_t row_bytes = a.row_bytes;

  Net::EntryBarrier(c, n, kOpBroadcast);
  for (int t = gwarp; t < a.num_tokens; t += num_gwarps) {
    const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
    const bool near = lane / per_node == my_node;
    const int near_slot = near ? my_slot : -1;
    const int my_msg = lane < num_ranks && !near && lane % per_node == local
                           ? a.node_pos[size_t(t) * num_nodes + lane / per_node] : -1;
    const unsigned dests = __ballot_sync(kFull, near_slot >= 0);
    const unsigned far = __ballot_sync(kFull, my_msg >= 0);
    WarpCopyToRows<V, true>(
        dests | far,
        [&](int d) {
          if ((far >> d) & 1) {
            return SendMessage(c, n, d / per_node, __shfl_sync(kFull, my_msg, d));
          }
          return Slot(c, d, rank, __shfl_sync(kFull, my_slot, d));
        },
        a.values + size_t(t) * row_bytes, row_bytes, lane);
    __syncwarp();  // every lane's stores precede the releases and the puts
    if (near_slot >= 0) StoreRelease(SlotFlag(c, lane, rank, near_slot), c.epoch);
    for (unsigned m = far; m; m &= m - 1) {
      const int f = __ffs(m) - 1;
      const int q = __shfl_sync(kFull, my_msg, f);
      Net::PutMessage(c, n, f, SendMessage(c, n, f / per_node, q), RecvMessage(c, n, my_node, q),
                      MessageSignal(c, n, my_node, q), n.message_stride);
    }
  }

  // Forward: the q-th message from node m goes to the ranks of my node its handle slots name.
  int max_count = 0;
  for (int m = 0; m < num_nodes; ++m) max_count = max(max_count, a.node_recv_count[m]);
  for (int w = gwarp; w < num_nodes * max_count; w += num_gwarps) {
    const int q = w / num_nodes, node = w % num_nodes, src = node * per_node + local;
    if (node == my_node || q >= a.node_recv_count[node]) continue;
    const int slot = lane < per_node
                         ? a.fwd_slots[(size_t(node) * a.num_tokens + q) * per_node + lane] : -1;
    if (lane == 0) Net::WaitMessage(MessageSignal(c, n, node, q), c, n, kOpBroadcast, src);
    __syncwarp();
    ForwardToNode<V>(c, n, src, slot, RecvMessage(c, n, node, q), row_bytes, lane);
  }
  Net::Quiet();

  for (int row = gwarp; row < a.recv_capacity; row += num_gwarps) {
    const int src = a.row_src[row];
    uint8_t* dst = a.rows + size_t(row) * row_bytes;
    if (src < 0) {
      WarpZero<V>(dst, row_bytes, lane);
      continue;
    }
    const int s = src / a.send_capacity, i = src % a.send_capacity;
    if (lane == 0) WaitFlag(SlotFlag(c, rank, s, i), c, kOpBroadcast, kPhaseSent, s);
    __syncwarp();
    WarpCopy<V, false>(dst, Slot(c, rank, s, i), row_bytes, lane);
  }
}

// f(V{}) with the widest vector type (16..1 bytes) that divides the row size.
template <typename F>
cudaError_t ByVector(size_t row_bytes, F f) {
  switch (VecBytes(row_bytes)) {
    case 16: return f(int4{});
    case 8: return f(int2{});
    case 4: return f(int{});
    case 2: return f(short{});
    default: return f(char{});
  }
}

template <typename V>
void TouchVectorKernels(cudaError_t& err) {
  Touch(err, DispatchKernel<V, false, true, NvshmemNet>);
  Touch(err, DispatchKernel<V, true, true, NvshmemNet>);
  Touch(err, BroadcastKernel<V>);
}

template <typename E, int kPack>
cudaError_t LaunchReturnE(const CommArgs& c, const NodeComm& n, const ReturnArgs& a,
                          cudaStream_t stream) {
  const bool vec = a.mode != kReturnGatherK && a.width % kPack == 0;
  auto kernel = vec ? ReturnKernel<E, kPack, NvshmemNet> : ReturnKernel<E, 1, NvshmemNet>;
  kernel<<<c.num_blocks, kThreads, 0, stream>>>(c, a, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchInternodeDispatch(const CommArgs& c, const NodeComm& n, const DispatchArgs& a,
                                    cudaStream_t stream) {
  return ByVector(a.x_row_bytes, [&](auto v) {
    using V = decltype(v);
    const int num_local = a.num_local_experts;
    if (a.expert_layout) {
      const size_t smem = sizeof(int) * (a.num_experts + 2 * num_local + 1);
      DispatchKernel<V, true, true, NvshmemNet><<<c.num_blocks, kThreads, smem, stream>>>(c, a, n);
    } else {
      const size_t smem = sizeof(int) * num_local;
      DispatchKernel<V, false, true, NvshmemNet><<<c.num_blocks, kThreads, smem, stream>>>(c, a, n);
    }
    return cudaGetLastError();
  });
}

cudaError_t LaunchInternodeReturn(const CommArgs& c, const NodeComm& n, const ReturnArgs& a,
                                  cudaStream_t stream) {
  ReturnArgs b = a;
  if (a.mode == kReturnRows) b.num_topk = 1;  // one row per slot: recv_rows is [R, S]
  switch (a.elem) {
    case kF32: return LaunchReturnE<float, 4>(c, n, b, stream);
    case kBF16: return LaunchReturnE<__nv_bfloat16, 8>(c, n, b, stream);
    default: return LaunchReturnE<__half, 8>(c, n, b, stream);
  }
}

cudaError_t LaunchInternodeBroadcast(const CommArgs& c, const NodeComm& n, const BroadcastArgs& a,
                                     cudaStream_t stream) {
  return ByVector(a.row_bytes, [&](auto v) {
    BroadcastKernel<decltype(v)><<<c.num_blocks, kThreads, 0, stream>>>(c, a, n);
    return cudaGetLastError();
  });
}

cudaError_t PreloadInternodeKernels() {
  cudaError_t err = cudaSuccess;
  TouchVectorKernels<int4>(err), TouchVectorKernels<int2>(err), TouchVectorKernels<int>(err);
  TouchVectorKernels<short>(err), TouchVectorKernels<char>(err);
  Touch(err, ReturnKernel<float, 4, NvshmemNet>), Touch(err, ReturnKernel<float, 1, NvshmemNet>);
  Touch(err, ReturnKernel<__nv_bfloat16, 8, NvshmemNet>);
  Touch(err, ReturnKernel<__nv_bfloat16, 1, NvshmemNet>);
  Touch(err, ReturnKernel<__half, 8, NvshmemNet>), Touch(err, ReturnKernel<__half, 1, NvshmemNet>);
  return err;
}

}  // namespace jax_ep
