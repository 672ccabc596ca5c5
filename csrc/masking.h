// Blockwise masking of BEiT for one image, shared by the CPU (masking.cpp) and CUDA
// (masking_cuda.cu) kernels so that both draw from the official distribution with the same code:
// the same seed gives the same masks on both devices.
//
// The official generator (beitfast/masking.py, MaskingGenerator) repeatedly tries to add one
// rectangle: up to ten attempts, each drawing an area uniform in [min_num_patches, budget], a
// log-uniform aspect ratio, h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), and, when
// the rectangle fits (h < height, w < width), a uniform top-left corner; the rectangle is kept when
// it adds between 1 and `budget` new patches. Generation stops at the target count or when a round
// of ten attempts adds nothing.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BEITFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BEITFAST_HOST_DEVICE inline
#endif

namespace beitfast::masking {

struct Params {
  int64_t height;
  int64_t width;
  int64_t num_masking_patches;
  int64_t min_num_patches;
  int64_t max_num_patches;
  double log_aspect_min;
  double log_aspect_max;
};

// SplitMix64 finaliser: a bijective 64-bit mix.
BEITFAST_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Counter-based stream of one image: output i is mix64(key + (i + 1) * gamma) with a key derived
// from (seed, image). Images are independent of the order (and the device) they are computed in.
struct ImageRng {
  uint64_t state;

  BEITFAST_HOST_DEVICE ImageRng(uint64_t seed, uint64_t image)
      : state(mix64(seed ^ mix64(image + 0x632be59bd9b4e019ULL))) {}

  BEITFAST_HOST_DEVICE uint64_t next() {
    state += 0x9e3779b97f4a7c15ULL;
    return mix64(state);
  }

  // Uniform in [0, 1) with 53 random bits, as Python's random.random().
  BEITFAST_HOST_DEVICE double uniform() {
    return static_cast<double>(next() >> 11) * 0x1.0p-53;
  }

  // Uniform in [lo, hi] as Python's random.uniform (hi may be below lo).
  BEITFAST_HOST_DEVICE double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

  // Uniform integer in [0, n] (inclusive, as random.randint(0, n)); the multiply-shift bias is
  // below (n + 1) / 2^32, far under what any test of the distribution can see.
  BEITFAST_HOST_DEVICE int64_t up_to(int64_t n) {
    return static_cast<int64_t>(((next() >> 32) * static_cast<uint64_t>(n + 1)) >> 32);
  }
};

// One attempt round: returns the number of patches the first useful rectangle added (0 if none of
// ten attempts added any). `mask` is the row-major [height, width] mask of the image.
BEITFAST_HOST_DEVICE int64_t add_block(bool* mask, const Params& p, int64_t budget, ImageRng& rng) {
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double area = rng.uniform(static_cast<double>(p.min_num_patches), static_cast<double>(budget));
    const double aspect = exp(rng.uniform(p.log_aspect_min, p.log_aspect_max));
    // rint rounds half to even, as Python's round(). Compared as doubles first so that extreme
    // aspect ratios (inf, NaN) are rejected before the integer conversion.
    const double h_rounded = rint(sqrt(area * aspect));
    const double w_rounded = rint(sqrt(area / aspect));
    if (!(w_rounded < static_cast<double>(p.width) && h_rounded < static_cast<double>(p.height))) continue;
    const int64_t h = static_cast<int64_t>(h_rounded);
    const int64_t w = static_cast<int64_t>(w_rounded);
    const int64_t top = rng.up_to(p.height - h);
    const int64_t left = rng.up_to(p.width - w);
    int64_t already = 0;
    for (int64_t i = top; i < top + h; ++i)
      for (int64_t j = left; j < left + w; ++j) already += mask[i * p.width + j];
    const int64_t added = h * w - already;
    if (added > 0 && added <= budget) {
      for (int64_t i = top; i < top + h; ++i)
        for (int64_t j = left; j < left + w; ++j) mask[i * p.width + j] = true;
      return added;
    }
  }
  return 0;
}

// Fills `mask` (height * width bools) with the blockwise mask of image `image` of the seed's batch.
BEITFAST_HOST_DEVICE void generate(bool* mask, const Params& p, uint64_t seed, uint64_t image) {
  const int64_t n = p.height * p.width;
  for (int64_t k = 0; k < n; ++k) mask[k] = false;
  ImageRng rng(seed, image);
  int64_t count = 0;
  while (count < p.num_masking_patches) {
    const int64_t left_to_mask = p.num_masking_patches - count;
    const int64_t budget = left_to_mask < p.max_num_patches ? left_to_mask : p.max_num_patches;
    const int64_t added = add_block(mask, p, budget, rng);
    if (added == 0) break;
    count += added;
  }
}

}  // namespace beitfast::masking

#if defined(BEITFAST_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace beitfast {
// Fills the [batch, height * width] masks on the device (masking_cuda.cu), one thread per image.
cudaError_t launch_blockwise_masks(bool* masks, int64_t batch, const masking::Params& params, uint64_t seed,
                                   cudaStream_t stream);
}  // namespace beitfast
#endif
