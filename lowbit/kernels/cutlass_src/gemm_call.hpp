// What every lowbit CUTLASS entry point does: reorder int4 weights at load, and with a built
// Gemm::Arguments ask for the workspace, or check, initialize and launch on the caller's stream. Status codes for the C ABI: 0 on success,
// 1000 + cutlass::Status from can_implement, 2000 + from initialize, 3000 + from run, else the CUDA
// error of the launch.
#pragma once

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"

namespace lowbit_cutlass {

// The SMs the persistent grid fills, and for a stream-K scheduler the split count: splits > 1 asks
// for that many K splits per tile, 1 lets CUTLASS's heuristic choose stream-K or data-parallel.
template <class Gemm, bool StreamK>
void set_schedule(typename Gemm::Arguments& args, int splits, int sm_count) {
  args.hw_info.sm_count = sm_count;
  if constexpr (StreamK) {
    using Decomp = typename Gemm::GemmKernel::TileScheduler::DecompositionMode;
    args.scheduler.splits = splits;
    args.scheduler.decomposition_mode = splits > 1 ? Decomp::SplitK : Decomp::Heuristic;
  }
}

template <class Gemm>
int query_workspace(typename Gemm::Arguments const& args, size_t* bytes) {
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) return static_cast<int>(st) + 1000;
  *bytes = Gemm::get_workspace_size(args);
  return 0;
}

template <class Gemm>
int run_gemm(typename Gemm::Arguments const& args, void* ws, cudaStream_t stream) {
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) return static_cast<int>(st) + 1000;
  st = gemm.initialize(args, ws, stream);
  if (st != cutlass::Status::kSuccess) return static_cast<int>(st) + 2000;
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return static_cast<int>(st) + 3000;
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? 0 : static_cast<int>(err);
}

// Reorder int4 weights (N x K, K-major: the checkpoint byte layout) into the order ``Atom`` (a CUTLASS
// memory-reordering atom) gives: src and dst are device buffers of N * K / 2 bytes. Runs on the
// default stream and synchronizes (load time only).
template <class Atom, class StrideW>
int reorder_int4(const void* src, void* dst, int N, int K) {
  auto shape = cute::make_shape(N, K, 1);
  auto layout_src = cute::make_layout(shape, cutlass::make_cute_packed_stride(StrideW{}, shape));
  auto layout_dst = cute::tile_to_shape(Atom{}, shape);
  cutlass::reorder_tensor(static_cast<const cutlass::int4b_t*>(src), layout_src,
                          static_cast<cutlass::int4b_t*>(dst), layout_dst);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? 0 : static_cast<int>(err);
}

// The inverse of reorder_int4: the kernels' order back to the checkpoint byte layout (N x K, K-major),
// for writing a loaded model's weights out. The same copy with the two layouts swapped.
template <class Atom, class StrideW>
int unreorder_int4(const void* src, void* dst, int N, int K) {
  auto shape = cute::make_shape(N, K, 1);
  auto layout_rows = cute::make_layout(shape, cutlass::make_cute_packed_stride(StrideW{}, shape));
  auto layout_atom = cute::tile_to_shape(Atom{}, shape);
  cutlass::reorder_tensor(static_cast<const cutlass::int4b_t*>(src), layout_atom,
                          static_cast<cutlass::int4b_t*>(dst), layout_rows);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? 0 : static_cast<int>(err);
}

}  // namespace lowbit_cutlass
