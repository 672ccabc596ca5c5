// beitfast::blockwise_masks: a batch of BEiT blockwise masks, one independent draw per image.
//
//   blockwise_masks(batch, height, width, ..., seed, device) -> bool [batch, height * width]
//   blockwise_masks.out(height, width, ..., seed, *, out)    fills a preallocated bool out
//
// The functional form has no tensor argument to dispatch on, so it is a CompositeExplicitAutograd
// kernel that allocates on `device` and calls the out form, which has a CPU kernel (here, threaded
// over images), a CUDA kernel (launched here in CUDA builds, defined in masking_cuda.cu) and a Meta
// kernel: torch.compile's fake tensors run the functional form on the meta device.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if defined(BEITFAST_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>

#include "masking.h"

namespace beitfast {
namespace {

void check_mask_arguments(int64_t height, int64_t width, int64_t num_masking_patches,
                          int64_t min_num_patches, int64_t max_num_patches, double log_aspect_min,
                          double log_aspect_max) {
  TORCH_CHECK(height >= 1 && width >= 1, "blockwise_masks: height and width must be >= 1, got height=",
              height, ", width=", width);
  TORCH_CHECK(num_masking_patches >= 0 && num_masking_patches <= height * width,
              "blockwise_masks: num_masking_patches must be in [0, ", height * width, "], got ",
              num_masking_patches);
  TORCH_CHECK(min_num_patches >= 1, "blockwise_masks: min_num_patches must be >= 1, got ", min_num_patches);
  TORCH_CHECK(max_num_patches >= 1, "blockwise_masks: max_num_patches must be >= 1, got ", max_num_patches);
  TORCH_CHECK(std::isfinite(log_aspect_min) && std::isfinite(log_aspect_max),
              "blockwise_masks: log_aspect_min and log_aspect_max must be finite, got ", log_aspect_min,
              " and ", log_aspect_max);
}

void check_out(const at::Tensor& out, int64_t height, int64_t width) {
  TORCH_CHECK(out.scalar_type() == at::kBool, "blockwise_masks: out must be a bool tensor, got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(1) == height * width,
              "blockwise_masks: out must have shape [batch, ", height * width, "] (height * width = ",
              height, " * ", width, "), got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "blockwise_masks: out must be contiguous");
}

// Validates the op's arguments and its `out` tensor for every kernel of the out form.
masking::Params mask_params(const at::Tensor& out, int64_t height, int64_t width,
                            int64_t num_masking_patches, int64_t min_num_patches,
                            int64_t max_num_patches, double log_aspect_min, double log_aspect_max) {
  check_mask_arguments(height, width, num_masking_patches, min_num_patches, max_num_patches,
                       log_aspect_min, log_aspect_max);
  check_out(out, height, width);
  return {height, width, num_masking_patches, min_num_patches, max_num_patches, log_aspect_min,
          log_aspect_max};
}

at::Tensor& blockwise_masks_out_cpu(int64_t height, int64_t width, int64_t num_masking_patches,
                                    int64_t min_num_patches, int64_t max_num_patches,
                                    double log_aspect_min, double log_aspect_max, int64_t seed,
                                    at::Tensor& out) {
  const masking::Params params = mask_params(out, height, width, num_masking_patches, min_num_patches,
                                             max_num_patches, log_aspect_min, log_aspect_max);
  bool* masks = out.data_ptr<bool>();
  const int64_t patches = height * width;
  // Threads pay off only for large batches: waking one can take milliseconds on a busy machine,
  // about what 2048 masks of 14x14 take on one core. Each thread gets at least ~2^19 patches.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 19) / patches);
  at::parallel_for(0, out.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t image = begin; image < end; ++image)
      masking::generate(masks + image * patches, params, static_cast<uint64_t>(seed),
                        static_cast<uint64_t>(image));
  });
  return out;
}

#if defined(BEITFAST_WITH_CUDA)
at::Tensor& blockwise_masks_out_cuda(int64_t height, int64_t width, int64_t num_masking_patches,
                                     int64_t min_num_patches, int64_t max_num_patches,
                                     double log_aspect_min, double log_aspect_max, int64_t seed,
                                     at::Tensor& out) {
  const masking::Params params = mask_params(out, height, width, num_masking_patches, min_num_patches,
                                             max_num_patches, log_aspect_min, log_aspect_max);
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(launch_blockwise_masks(out.data_ptr<bool>(), out.size(0), params, static_cast<uint64_t>(seed),
                                        c10::cuda::getCurrentCUDAStream()));
  return out;
}
#endif

at::Tensor& blockwise_masks_out_meta(int64_t height, int64_t width, int64_t num_masking_patches,
                                     int64_t min_num_patches, int64_t max_num_patches,
                                     double log_aspect_min, double log_aspect_max, int64_t /*seed*/,
                                     at::Tensor& out) {
  mask_params(out, height, width, num_masking_patches, min_num_patches, max_num_patches, log_aspect_min,
              log_aspect_max);
  return out;
}

at::Tensor blockwise_masks(int64_t batch, int64_t height, int64_t width, int64_t num_masking_patches,
                           int64_t min_num_patches, int64_t max_num_patches, double log_aspect_min,
                           double log_aspect_max, int64_t seed, c10::Device device) {
  TORCH_CHECK(batch >= 0, "blockwise_masks: batch must be >= 0, got ", batch);
  check_mask_arguments(height, width, num_masking_patches, min_num_patches, max_num_patches,
                       log_aspect_min, log_aspect_max);
  at::Tensor out = at::empty({batch, height * width}, at::TensorOptions().dtype(at::kBool).device(device));
  static const auto out_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("beitfast::blockwise_masks", "out")
                                 .typed<at::Tensor&(int64_t, int64_t, int64_t, int64_t, int64_t, double,
                                                    double, int64_t, at::Tensor&)>();
  out_op.call(height, width, num_masking_patches, min_num_patches, max_num_patches, log_aspect_min,
              log_aspect_max, seed, out);
  return out;
}

}  // namespace
}  // namespace beitfast

TORCH_LIBRARY_FRAGMENT(beitfast, m) {
  m.def(
      "blockwise_masks(int batch, int height, int width, int num_masking_patches, int min_num_patches, "
      "int max_num_patches, float log_aspect_min, float log_aspect_max, int seed, Device device) -> Tensor");
  m.def(
      "blockwise_masks.out(int height, int width, int num_masking_patches, int min_num_patches, "
      "int max_num_patches, float log_aspect_min, float log_aspect_max, int seed, *, Tensor(a!) out) "
      "-> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(beitfast, CompositeExplicitAutograd, m) {
  m.impl("blockwise_masks", &beitfast::blockwise_masks);
}

TORCH_LIBRARY_IMPL(beitfast, CPU, m) {
  m.impl("blockwise_masks.out", &beitfast::blockwise_masks_out_cpu);
}

#if defined(BEITFAST_WITH_CUDA)
TORCH_LIBRARY_IMPL(beitfast, CUDA, m) {
  m.impl("blockwise_masks.out", &beitfast::blockwise_masks_out_cuda);
}
#endif

TORCH_LIBRARY_IMPL(beitfast, Meta, m) {
  m.impl("blockwise_masks.out", &beitfast::blockwise_masks_out_meta);
}
