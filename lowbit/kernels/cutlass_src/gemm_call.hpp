// What every lowbit CUTLASS entry point does with a built Gemm::Arguments: ask for the workspace, or
// check, initialize and launch on the caller's stream. Status codes for the C ABI: 0 on success,
// 1000 + cutlass::Status from can_implement, 2000 + from initialize, 3000 + from run, else the CUDA
// error of the launch.
#pragma once

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace lowbit_cutlass {

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

}  // namespace lowbit_cutlass
