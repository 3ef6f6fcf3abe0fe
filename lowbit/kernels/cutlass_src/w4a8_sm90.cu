// W4A8 on Hopper through CUTLASS's mixed-input wgmma mainloop, on fp8 or int8 tensor cores (issue 18).
//
// y (M x N, fp16 or bf16, row-major) = (s_x[m] * s_w[n]) * sum_k xq[m, k] * w[n, k]
//   xq (M x K) e4m3 or int8, row-major, per-token fp32 scales s_x (M,);
//   w (N x K) int4 in two's complement, two codes a byte (column 2j low nibble: the checkpoint layout),
//   per-output-channel fp32 scales s_w (N,).
//
// Every int4 code is exact in e4m3 and int8, so the mainloop only widens (CUTLASS's ConvertOnly mode,
// no scaling before the MMA) and the two scales are applied to the fp32 accumulators in the epilogue
// (an epilogue visitor tree: a column broadcast of s_w times a row broadcast of s_x). This is the
// OdysseyLLM FastGEMM idea (int4 widened to 8 bits in registers, 8-bit tensor cores) on wgmma:
// Hopper's mma.sync s4 rate is 52 TOPS, its 8-bit wgmma ~1979 dense TOPS.
// The problem is computed transposed as in w4a16_sm90.cu (the narrow operand must be wgmma's A).

#include <cstdint>
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"

#include "gemm_call.hpp"

using namespace cute;

namespace lowbit_w4a8 {

using Quant = cutlass::int4b_t;
// LB_OUT_BF16 (a part's macro): y in bf16 instead of fp16, for bf16 models
#if defined(LB_OUT_BF16) && LB_OUT_BF16
using Out = cutlass::bfloat16_t;
#else
using Out = cutlass::half_t;
#endif

using LayoutX_T = cutlass::layout::ColumnMajor;  // transpose of the activations' row-major
using LayoutY_T = cutlass::layout::ColumnMajor;  // transpose of y's row-major
using StrideX = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;
using StrideW = cutlass::detail::TagToStrideB_t<cutlass::layout::ColumnMajor>;

constexpr int kAlignW = 128 / cutlass::sizeof_bits<Quant>::value;
constexpr int kAlignY = 128 / cutlass::sizeof_bits<Out>::value;

template <class Act>
using Accum = std::conditional_t<std::is_same_v<Act, int8_t>, int32_t, float>;

// e4m3 and int8 wgmma operands have the same register layout (k_width 4), so one reordering serves
// both; CUTLASS's helper builds it from an fp32-accumulating atom, which exists for e4m3 only.
using ReorderAtom = decltype(cutlass::compute_memory_reordering_atom<cutlass::float_e4m3_t>());
using LayoutW_Reordered = decltype(cute::tile_to_shape(ReorderAtom{}, Layout<Shape<int, int, int>, StrideW>{}));

template <class Act, int TileN, int TileM, int ClusterN, bool Cooperative, bool StreamK>
struct Config {
  using TileShape = Shape<Int<TileN>, Int<TileM>, _128>;  // 128 8-bit values: one 128-byte TMA row
  using ClusterShape = Shape<Int<ClusterN>, _1, _1>;
  using KernelSchedule = std::conditional_t<Cooperative, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                            cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
  using EpilogueSchedule = std::conditional_t<Cooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                              cutlass::epilogue::TmaWarpSpecialized>;
  using Acc = Accum<Act>;
  // y = s_w (per cutlass row) * (s_x (per cutlass column) * acc)
  using ScaleW = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using ScaleX = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using MulX = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                                      cutlass::FloatRoundStyle::round_to_nearest>;
  using MulW = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, Out, float,
                                                      cutlass::FloatRoundStyle::round_to_nearest>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<
      MulW, ScaleW, cutlass::epilogue::fusion::Sm90EVT<MulX, ScaleX, cutlass::epilogue::fusion::Sm90AccFetch>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, float,
      void, LayoutY_T, kAlignY, Out, LayoutY_T, kAlignY, EpilogueSchedule, Tree>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Quant, LayoutW_Reordered, kAlignW,
      Act, LayoutX_T, 16, Acc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Scheduler = std::conditional_t<StreamK, cutlass::gemm::StreamKScheduler, void>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <class Cfg, class Act>
typename Cfg::Gemm::Arguments make_args(const void* xq, const void* sx, const void* w, const void* sw, void* y,
                                        int M, int N, int K, int splits, int sm_count) {
  using Gemm = typename Cfg::Gemm;
  using StrideY = typename Gemm::GemmKernel::StrideD;
  auto layout_w = cute::tile_to_shape(ReorderAtom{}, cute::make_shape(N, K, 1));
  StrideX stride_x = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(M, K, 1));
  StrideY stride_y = cutlass::make_cute_packed_stride(StrideY{}, cute::make_shape(N, M, 1));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {N, M, K, 1},
      {static_cast<const Quant*>(w), layout_w, static_cast<const Act*>(xq), stride_x},
      {{}, nullptr, stride_y, static_cast<Out*>(y), stride_y}};
  auto& tree = args.epilogue.thread;
  tree.op_0 = {static_cast<const float*>(sw), 0.0f, {}};                    // s_w, one per cutlass row
  tree.op_1.op_0 = {static_cast<const float*>(sx), 0.0f, {}};               // s_x, one per cutlass column
  lowbit_cutlass::set_schedule<Gemm, !std::is_same_v<typename Cfg::Scheduler, void>>(args, splits, sm_count);
  return args;
}

template <class Cfg, class Act>
int workspace(int M, int N, int K, int splits, int sm_count, size_t* bytes) {
  return lowbit_cutlass::query_workspace<typename Cfg::Gemm>(
      make_args<Cfg, Act>(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K, splits, sm_count), bytes);
}

template <class Cfg, class Act>
int run(const void* xq, const void* sx, const void* w, const void* sw, void* y, int M, int N, int K, int splits,
        int sm_count, void* ws, cudaStream_t stream) {
  return lowbit_cutlass::run_gemm<typename Cfg::Gemm>(
      make_args<Cfg, Act>(xq, sx, w, sw, y, M, N, K, splits, sm_count), ws, stream);
}

}  // namespace lowbit_w4a8

using namespace lowbit_w4a8;

#define LB_CAT2(a, b) a##b
#define LB_CAT(a, b) LB_CAT2(a, b)

// One part per configuration (lowbit/kernels/cutlass_build.py): LB_PART its index, LB_ACT_FP8 the
// activation type (1: e4m3, 0: int8), LB_TILE_N ... LB_STREAM_K the tile; LB_PART < 0: the reorder.
#if LB_PART >= 0
using PartAct = std::conditional_t<LB_ACT_FP8, cutlass::float_e4m3_t, int8_t>;
using PartConfig = Config<PartAct, LB_TILE_N, LB_TILE_M, LB_CLUSTER_N, LB_COOPERATIVE, LB_STREAM_K>;
extern "C" {
int LB_CAT(lb_w4a8_workspace_, LB_PART)(int M, int N, int K, int splits, int sm_count, size_t* bytes) {
  return workspace<PartConfig, PartAct>(M, N, K, splits, sm_count, bytes);
}
int LB_CAT(lb_w4a8_gemm_, LB_PART)(const void* xq, const void* sx, const void* w, const void* sw, void* y, int M,
                                   int N, int K, int splits, int sm_count, void* ws, void* stream) {
  return run<PartConfig, PartAct>(xq, sx, w, sw, y, M, N, K, splits, sm_count, ws, static_cast<cudaStream_t>(stream));
}
}
#else
extern "C" {
// Reorder int4 weights (N x K, checkpoint byte layout) for 8-bit MMA operands (e4m3 and int8 alike).
// Default stream; synchronizes (load time only).
int lb_w4a8_reorder(const void* src, void* dst, int N, int K) {
  return lowbit_cutlass::reorder_int4<ReorderAtom, StrideW>(src, dst, N, K);
}
// The inverse (the kernels' order back to the checkpoint layout), for saving a loaded model.
int lb_w4a8_unreorder(const void* src, void* dst, int N, int K) {
  return lowbit_cutlass::unreorder_int4<ReorderAtom, StrideW>(src, dst, N, K);
}
}
#endif
