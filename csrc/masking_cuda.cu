// CUDA kernel of beitfast::blockwise_masks.out: one thread per image runs the per-image generator of
// masking.h on its own counter-based random stream, so the masks equal the CPU kernel's for the same
// seed. The launcher is registered with the dispatcher in masking.cpp: this file includes no torch
// header, which keeps its nvcc time to seconds.
#include <cuda_runtime.h>

#include "masking.h"

namespace beitfast {
namespace {

constexpr int kThreadsPerBlock = 128;

__global__ void blockwise_masks_kernel(bool* __restrict__ masks, int64_t batch, masking::Params params,
                                       uint64_t seed) {
  const int64_t image = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (image >= batch) return;
  masking::generate(masks + image * params.height * params.width, params, seed,
                    static_cast<uint64_t>(image));
}

}  // namespace

cudaError_t launch_blockwise_masks(bool* masks, int64_t batch, const masking::Params& params, uint64_t seed,
                                   cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned int>((batch + kThreadsPerBlock - 1) / kThreadsPerBlock);
  blockwise_masks_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(masks, batch, params, seed);
  return cudaGetLastError();
}

}  // namespace beitfast
