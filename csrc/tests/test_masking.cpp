// C++ test of the CPU blockwise masking (csrc/masking.h, csrc/masking.cpp), run by ctest.
// The statistical comparison with the official Python generator is in tests/test_masking.py; this
// checks the invariants of the C++ code itself and the op registered in the dispatcher.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "masking.h"

namespace {

int failures = 0;

void expect(bool condition, const std::string& what) {
  if (!condition) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

using beitfast::masking::Params;

Params official_params(int64_t height, int64_t width, int64_t num_masking_patches) {
  const double log_aspect = std::log(0.3);
  return {height, width, num_masking_patches, 16, num_masking_patches, log_aspect, -log_aspect};
}

std::vector<bool> draw(const Params& p, uint64_t seed, uint64_t image) {
  std::vector<char> mask(p.height * p.width);
  beitfast::masking::generate(reinterpret_cast<bool*>(mask.data()), p, seed, image);
  return {mask.begin(), mask.end()};
}

int64_t count(const std::vector<bool>& mask) {
  int64_t n = 0;
  for (bool m : mask) n += m;
  return n;
}

void test_counts_and_coverage(int64_t height, int64_t width, int64_t target) {
  const Params p = official_params(height, width, target);
  const int draws = 20000;
  std::vector<int64_t> frequency(height * width, 0);
  int64_t total = 0, exact = 0;
  for (int image = 0; image < draws; ++image) {
    const std::vector<bool> mask = draw(p, 7, image);
    const int64_t n = count(mask);
    expect(n <= target, "never more than num_masking_patches");
    total += n;
    exact += n == target;
    for (int64_t k = 0; k < height * width; ++k) frequency[k] += mask[k];
  }
  const std::string grid = std::to_string(height) + "x" + std::to_string(width);
  // The official generator reaches the target in about two thirds of 14x14/75 draws and stops at
  // most a few patches short otherwise (mean about 74.5).
  expect(exact > draws / 2, grid + ": most masks have exactly num_masking_patches");
  expect(static_cast<double>(total) / draws > target - 2.0, grid + ": mean count close to the target");
  double worst_asymmetry = 0;
  for (int64_t i = 0; i < height; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      expect(frequency[i * width + j] > 0, grid + ": every position is masked sometimes");
      // Top-left corners are uniform, so the marginals are symmetric under a 180-degree rotation.
      const int64_t mirrored = frequency[(height - 1 - i) * width + (width - 1 - j)];
      worst_asymmetry = std::fmax(worst_asymmetry,
                                  std::fabs(static_cast<double>(frequency[i * width + j] - mirrored)) / draws);
    }
  }
  expect(worst_asymmetry < 0.03, grid + ": marginal frequencies symmetric (worst difference " +
                                     std::to_string(worst_asymmetry) + ")");
}

void test_streams() {
  const Params p = official_params(14, 14, 75);
  expect(draw(p, 3, 5) == draw(p, 3, 5), "same (seed, image) gives the same mask");
  expect(draw(p, 3, 5) != draw(p, 4, 5), "another seed gives another mask");
  expect(draw(p, 3, 5) != draw(p, 3, 6), "another image gives another mask");
}

void test_edge_targets() {
  expect(count(draw(official_params(14, 14, 0), 1, 0)) == 0, "num_masking_patches=0 masks nothing");
  // A rectangle must fit strictly inside (h < height, w < width): one row cannot hold any.
  expect(count(draw(official_params(1, 40, 20), 1, 0)) == 0, "a single-row grid masks nothing");
}

using BlockwiseMasks = at::Tensor(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double,
                                  int64_t, c10::Device);

void test_registered_op() {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("beitfast::blockwise_masks", "")
                      .typed<BlockwiseMasks>();
  const Params p = official_params(9, 13, 40);
  const at::Tensor masks = op.call(300, 9, 13, 40, 16, 40, p.log_aspect_min, p.log_aspect_max, 11,
                                   c10::Device(c10::kCPU));
  expect(masks.scalar_type() == at::kBool && masks.dim() == 2 && masks.size(0) == 300 &&
             masks.size(1) == 9 * 13,
         "op returns bool [batch, height * width]");
  bool same = true;
  for (int image = 0; image < 300; ++image) {
    const std::vector<bool> expected = draw(p, 11, image);
    const bool* row = masks.data_ptr<bool>() + image * 9 * 13;
    for (int64_t k = 0; k < 9 * 13; ++k) same = same && row[k] == expected[k];
  }
  expect(same, "threaded op equals the per-image generator");
  bool raised = false;
  try {
    op.call(2, 14, 14, 500, 16, 500, -1.0, 1.0, 0, c10::Device(c10::kCPU));
  } catch (const c10::Error& error) {
    raised = std::string(error.what()).find("num_masking_patches must be in [0, 196], got 500") !=
             std::string::npos;
  }
  expect(raised, "too many masking patches raises a clear error");
}

}  // namespace

int main() {
  test_counts_and_coverage(14, 14, 75);
  test_counts_and_coverage(7, 20, 50);
  test_streams();
  test_edge_targets();
  test_registered_op();
  if (failures == 0) std::printf("test_masking: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
