// CUDA kernel of beitfast::blockwise_masks.out (see masking.cpp): one thread per image runs the
// per-image generator of masking.h on its own counter-based random stream, so the masks equal the
// CPU kernel's for the same seed.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

at::Tensor& blockwise_masks_out_cuda(int64_t height, int64_t width, int64_t num_masking_patches,
                                     int64_t min_num_patches, int64_t max_num_patches,
                                     double log_aspect_min, double log_aspect_max, int64_t seed,
                                     at::Tensor& out) {
  const masking::Params params = mask_params(out, height, width, num_masking_patches, min_num_patches,
                                             max_num_patches, log_aspect_min, log_aspect_max);
  const int64_t batch = out.size(0);
  if (batch == 0) return out;
  const c10::cuda::CUDAGuard guard(out.device());
  const auto blocks = static_cast<unsigned int>((batch + kThreadsPerBlock - 1) / kThreadsPerBlock);
  blockwise_masks_kernel<<<blocks, kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<bool>(), batch, params, static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace beitfast

TORCH_LIBRARY_IMPL(beitfast, CUDA, m) {
  m.impl("blockwise_masks.out", &beitfast::blockwise_masks_out_cuda);
}
