// W4A16 on Hopper through CUTLASS's mixed-input wgmma mainloop (issue 18, item 1).
//
// y (M x N, row-major) = x (M x K, row-major) @ dequant(w)^T in fp16 or bf16 (LB_BF16), with w (N x K)
// int4 in two's complement, two codes a byte (column 2j low nibble, 2j+1 high: the checkpoint layout of
// lowbit.numerics.primitives.pack_int4), and scales (G x N) in the activations' type, G = K / group.
//
// Why CUTLASS here: Hopper's wgmma takes its A operand from registers, so the narrow weights can be
// widened to fp16 in registers while TMA keeps the next stages in flight and a producer warp feeds
// two consumer warpgroups (KernelTmaWarpSpecializedCooperative). Triton 3.6 cannot keep a
// register-operand wgmma in flight across K steps, and our Gluon kernels are latency-bound at M >= 128
// (docs/kernels.md). The narrow type must be wgmma's A, so the problem is computed transposed:
// D (N x M, column-major = y row-major) = W (N x K) @ X^T (K x M).
//
// The weights are reordered once at load (lb_w4a16_reorder) with CUTLASS's
// compute_memory_reordering_atom so that each thread's 16 codes of a wgmma are contiguous (one
// 64-bit shared load) in the [0,2,4,6,1,3,5,7] nibble order its int4 -> fp16 converter expects.
//
// C ABI (loaded with ctypes by lowbit/kernels/cutlass_w4a16.py); every function returns 0 or a
// CUTLASS/CUDA status code, and never synchronizes except the load-time reorder.

#include <cstdint>
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"

#include "gemm_call.hpp"

using namespace cute;

namespace lowbit_w4a16 {

// LB_BF16 (a part's macro): bf16 activations, scales and output instead of fp16.
#if defined(LB_BF16) && LB_BF16
using Act = cutlass::bfloat16_t;
#else
using Act = cutlass::half_t;
#endif
using Quant = cutlass::int4b_t;
using Scale = Act;  // the mainloop scales in the MMA's type
using Out = Act;
using Acc = float;

// The problem as the unswapped GEMM sees it: activations (M x K) row-major, weights K x N column-major.
using LayoutX = cutlass::layout::RowMajor;
using LayoutW = cutlass::layout::ColumnMajor;
using LayoutX_T = cutlass::layout::LayoutTranspose<LayoutX>::type;
using LayoutW_T = cutlass::layout::LayoutTranspose<LayoutW>::type;
using LayoutY_T = cutlass::layout::LayoutTranspose<cutlass::layout::RowMajor>::type;
using StrideX = cutlass::detail::TagToStrideA_t<LayoutX>;
using StrideW = cutlass::detail::TagToStrideB_t<LayoutW>;

constexpr int kAlignX = 128 / cutlass::sizeof_bits<Act>::value;
constexpr int kAlignW = 128 / cutlass::sizeof_bits<Quant>::value;
constexpr int kAlignY = 128 / cutlass::sizeof_bits<Out>::value;

// [0,2,4,6,1,3,5,7]: the nibble order of CUTLASS's int4 -> fp16 shuffle converter.
using ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;
// The register-operand layout of a 16-bit wgmma is the same for fp16 and bf16, so one reordering
// (built with fp16, in the shared part) serves both activation types.
using ReorderAtom = decltype(cutlass::compute_memory_reordering_atom<cutlass::half_t, Layout<Shape<_1, _1>>,
                                                                     ValueShuffle>());
using LayoutW_Reordered = decltype(cute::tile_to_shape(ReorderAtom{}, Layout<Shape<int, int, int>, StrideW>{}));

// One configuration: tile (weight rows x tokens x K), cluster, schedule, tile scheduler.
template <int TileN, int TileM, int ClusterN, bool Cooperative, bool StreamK>
struct Config {
  using TileShape = Shape<Int<TileN>, Int<TileM>, _64>;
  using ClusterShape = Shape<Int<ClusterN>, _1, _1>;
  using KernelSchedule = std::conditional_t<Cooperative, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                            cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
  using EpilogueSchedule = std::conditional_t<Cooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                              cutlass::epilogue::TmaWarpSpecialized>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
      void, LayoutY_T, kAlignY,  // no C operand: beta = 0
      Out, LayoutY_T, kAlignY, EpilogueSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<Quant, Scale>, LayoutW_Reordered, kAlignW,
      Act, LayoutX_T, kAlignX, Acc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Scheduler = std::conditional_t<StreamK, cutlass::gemm::StreamKScheduler, void>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <class Cfg>
typename Cfg::Gemm::Arguments make_args(const void* x, const void* w, const void* scales, void* y, int M, int N,
                                        int K, int group, int splits, int sm_count) {
  using Gemm = typename Cfg::Gemm;
  using StrideS = typename Cfg::Mainloop::StrideScale;
  using StrideY = typename Gemm::GemmKernel::StrideD;
  auto layout_w = cute::tile_to_shape(ReorderAtom{}, cute::make_shape(N, K, 1));
  StrideX stride_x = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(M, K, 1));
  StrideS stride_s = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(N, K / group, 1));
  StrideY stride_y = cutlass::make_cute_packed_stride(StrideY{}, cute::make_shape(N, M, 1));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {N, M, K, 1},
      {static_cast<const Quant*>(w), layout_w, static_cast<const Act*>(x), stride_x,
       static_cast<const Scale*>(scales), stride_s, group},
      {{1.0f, 0.0f}, nullptr, stride_y, static_cast<Out*>(y), stride_y}};
  lowbit_cutlass::set_schedule<Gemm, !std::is_same_v<typename Cfg::Scheduler, void>>(args, splits, sm_count);
  return args;
}

template <class Cfg>
int workspace(int M, int N, int K, int group, int splits, int sm_count, size_t* bytes) {
  // can_implement asks for a scale pointer in this mode: any aligned non-null one answers for the shape
  alignas(16) static const Scale probe[8] = {};
  return lowbit_cutlass::query_workspace<typename Cfg::Gemm>(
      make_args<Cfg>(nullptr, nullptr, probe, nullptr, M, N, K, group, splits, sm_count), bytes);
}

template <class Cfg>
int run(const void* x, const void* w, const void* scales, void* y, int M, int N, int K, int group, int splits,
        int sm_count, void* ws, cudaStream_t stream) {
  return lowbit_cutlass::run_gemm<typename Cfg::Gemm>(
      make_args<Cfg>(x, w, scales, y, M, N, K, group, splits, sm_count), ws, stream);
}

}  // namespace lowbit_w4a16

using namespace lowbit_w4a16;

#define LB_CAT2(a, b) a##b
#define LB_CAT(a, b) LB_CAT2(a, b)

// Built once per configuration, in parallel (lowbit/kernels/cutlass_build.py): LB_PART is its index,
// LB_TILE_N, LB_TILE_M, LB_CLUSTER_N, LB_COOPERATIVE, LB_STREAM_K its template arguments; the part with
// LB_PART < 0 holds what is shared.
#if LB_PART >= 0
using PartConfig = Config<LB_TILE_N, LB_TILE_M, LB_CLUSTER_N, LB_COOPERATIVE, LB_STREAM_K>;
extern "C" {
int LB_CAT(lb_w4a16_workspace_, LB_PART)(int M, int N, int K, int group, int splits, int sm_count, size_t* bytes) {
  return workspace<PartConfig>(M, N, K, group, splits, sm_count, bytes);
}
int LB_CAT(lb_w4a16_gemm_, LB_PART)(const void* x, const void* w, const void* scales, void* y, int M, int N,
                                    int K, int group, int splits, int sm_count, void* ws, void* stream) {
  return run<PartConfig>(x, w, scales, y, M, N, K, group, splits, sm_count, ws, static_cast<cudaStream_t>(stream));
}
}
#else
extern "C" {
// Reorder int4 weights (N x K, checkpoint byte layout) into the kernels' order: src and dst are device
// buffers of N * K / 2 bytes. Runs on the default stream and synchronizes (load time only).
int lb_w4a16_reorder(const void* src, void* dst, int N, int K) {
  return lowbit_cutlass::reorder_int4<ReorderAtom, StrideW>(src, dst, N, K);
}
// The inverse (the kernels' order back to the checkpoint layout), for saving a loaded model.
int lb_w4a16_unreorder(const void* src, void* dst, int N, int K) {
  return lowbit_cutlass::unreorder_int4<ReorderAtom, StrideW>(src, dst, N, K);
}
}
#endif
