// CUDA backend of the masked patch embedding (Python side: beitfast/ops/patch_embed.py, which wraps
// these two ops in the custom ops beitfast::patch_embed_cuda[_backward] with autograd and fake kernels).
//
// forward:  gather pixels into patches [B*N, C*p*p] (converted to the weight dtype; masked rows are
//           zeros and their pixels are never read) -> cuBLAS GEMM with the weight -> one epilogue
//           kernel writing [B, (1+)N, D] (bias, mask-token select, cls row, position embedding).
// backward: dY of the kept rows (masked rows zeroed: they were replaced, so they feed the mask token
//           only), the patches gathered again (cheaper than keeping them alive), and cuBLAS GEMMs for
//           the weight and, when asked, the image gradient, scattered back into the image layout.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace beitfast {
namespace {

constexpr int kThreads = 256;

// Where the patches lie in the image, for any strides (NCHW or channels-last).
struct PatchGeometry {
  int64_t rows;        // B * N
  int64_t patches;     // N
  int64_t grid_w;      // patches per image row
  int64_t cols;        // K = C * p * p
  int64_t patch;       // p
  int64_t stride_b, stride_c, stride_h, stride_w;

  __device__ int64_t pixel(int64_t row, int64_t col) const {
    const int64_t b = row / patches, t = row % patches;
    const int64_t c = col / (patch * patch), r = col % (patch * patch);
    const int64_t y = (t / grid_w) * patch + r / patch;
    const int64_t x = (t % grid_w) * patch + r % patch;
    return b * stride_b + c * stride_c + y * stride_h + x * stride_w;
  }
};

PatchGeometry geometry(const at::Tensor& images, int64_t patch) {
  const int64_t gh = images.size(2) / patch, gw = images.size(3) / patch;
  return {images.size(0) * gh * gw, gh * gw, gw, images.size(1) * patch * patch, patch,
          images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
}

unsigned int blocks_for(int64_t n) {
  // A grid-stride loop covers the rest; more blocks than this only adds scheduling work.
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 65535LL * 8)));
}

template <typename in_t, typename out_t>
__global__ void gather_patches_kernel(const in_t* __restrict__ images, const bool* __restrict__ mask,
                                      out_t* __restrict__ patches, PatchGeometry g) {
  const int64_t total = g.rows * g.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / g.cols, col = i % g.cols;
    const bool replaced = mask != nullptr && mask[row];
    patches[i] = replaced ? out_t(0.0f) : out_t(static_cast<float>(images[g.pixel(row, col)]));
  }
}

template <typename grad_t, typename img_t>
__global__ void scatter_patches_kernel(const grad_t* __restrict__ patches, img_t* __restrict__ images,
                                       PatchGeometry g) {
  const int64_t total = g.rows * g.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    images[g.pixel(i / g.cols, i % g.cols)] = img_t(static_cast<float>(patches[i]));
  }
}

template <typename scalar_t>
__global__ void epilogue_kernel(const scalar_t* __restrict__ proj, const scalar_t* __restrict__ bias,
                                const bool* __restrict__ mask, const scalar_t* __restrict__ mask_token,
                                const scalar_t* __restrict__ cls_token, const scalar_t* __restrict__ pos,
                                scalar_t* __restrict__ out, int64_t batch, int64_t patches, int64_t dim) {
  const int has_cls = cls_token != nullptr;
  const int64_t length = patches + has_cls;
  const int64_t total = batch * length * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % dim, pos_row = (i / dim) % length, b = i / (dim * length);
    float value;
    if (has_cls && pos_row == 0) {
      value = static_cast<float>(cls_token[d]);
    } else {
      const int64_t row = b * patches + pos_row - has_cls;
      if (mask != nullptr && mask[row]) {
        value = static_cast<float>(mask_token[d]);
      } else {
        value = static_cast<float>(proj[row * dim + d]) + (bias ? static_cast<float>(bias[d]) : 0.0f);
      }
    }
    if (pos != nullptr) value += static_cast<float>(pos[pos_row * dim + d]);
    out[i] = scalar_t(value);
  }
}

// dY of the patch rows, [B*N, D], with the masked rows zeroed.
template <typename scalar_t>
__global__ void kept_rows_kernel(const scalar_t* __restrict__ grad, const bool* __restrict__ mask,
                                 scalar_t* __restrict__ kept, int64_t rows, int64_t patches, int64_t dim,
                                 int has_cls) {
  const int64_t total = rows * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / dim, d = i % dim;
    const int64_t src = ((row / patches) * (patches + has_cls) + has_cls + row % patches) * dim + d;
    kept[i] = (mask != nullptr && mask[row]) ? scalar_t(0.0f) : grad[src];
  }
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

void check_inputs(const at::Tensor& images, const at::Tensor& weight, int64_t patch,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(images.is_cuda() && images.dim() == 4, "patch_embed_cuda: images must be a CUDA [B, C, H, W] tensor");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 4 && weight.size(1) == images.size(1) &&
                  weight.size(2) == patch && weight.size(3) == patch,
              "patch_embed_cuda: weight must be a contiguous [D, C, p, p] tensor, got ", weight.sizes());
  TORCH_CHECK(images.size(2) % patch == 0 && images.size(3) % patch == 0,
              "patch_embed_cuda: image size must be divisible by patch_size ", patch);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                    mask->numel() == images.size(0) * (images.size(2) / patch) * (images.size(3) / patch),
                "patch_embed_cuda: mask must be a contiguous bool [B, N] tensor");
  }
}

void check_param(const std::optional<at::Tensor>& t, const at::Tensor& weight, int64_t numel, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == weight.scalar_type() && t->is_contiguous() && t->numel() == numel,
              "patch_embed_cuda: ", name, " must be a contiguous ", weight.scalar_type(), " tensor of ", numel,
              " values, got ", t->scalar_type(), " ", t->sizes());
}

// Patches [B*N, C*p*p] in the weight dtype (masked rows zero).
at::Tensor gather_patches(const at::Tensor& images, const at::Tensor& weight, int64_t patch,
                          const std::optional<at::Tensor>& mask) {
  const PatchGeometry g = geometry(images, patch);
  at::Tensor patches = at::empty({g.rows, g.cols}, weight.options());
  if (patches.numel() == 0) return patches;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "gather_patches", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gather_patches", [&] {
      gather_patches_kernel<in_t, scalar_t><<<blocks_for(patches.numel()), kThreads, 0, stream>>>(
          images.data_ptr<in_t>(), optional_ptr<bool>(mask), patches.data_ptr<scalar_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return patches;
}

at::Tensor patch_embed_fwd_cuda(const at::Tensor& images, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, int64_t patch_size,
                                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& mask_token,
                                const std::optional<at::Tensor>& cls_token,
                                const std::optional<at::Tensor>& pos_embed) {
  check_inputs(images, weight, patch_size, mask);
  const int64_t dim = weight.size(0);
  const PatchGeometry g = geometry(images, patch_size);
  const int64_t length = g.patches + cls_token.has_value();
  check_param(bias, weight, dim, "bias");
  check_param(mask_token, weight, dim, "mask_token");
  check_param(cls_token, weight, dim, "cls_token");
  check_param(pos_embed, weight, length * dim, "pos_embed");
  TORCH_CHECK(!mask.has_value() || mask_token.has_value(), "patch_embed_cuda: a mask needs a mask_token");
  const c10::cuda::CUDAGuard guard(images.device());

  at::Tensor out = at::empty({images.size(0), length, dim}, weight.options());
  if (out.numel() == 0) return out;
  const at::Tensor proj = at::mm(gather_patches(images, weight, patch_size, mask), weight.view({dim, g.cols}).t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "patch_embed_epilogue", [&] {
    epilogue_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        proj.data_ptr<scalar_t>(), optional_ptr<scalar_t>(bias), optional_ptr<bool>(mask),
        optional_ptr<scalar_t>(mask_token), optional_ptr<scalar_t>(cls_token), optional_ptr<scalar_t>(pos_embed),
        out.data_ptr<scalar_t>(), images.size(0), g.patches, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// (d_images or empty, d_weight, d_bias float32, d_mask_token float32 or empty). The position and cls
// gradients are batch sums of grad, taken on the Python side.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& images, const at::Tensor& weight, int64_t patch_size,
    const std::optional<at::Tensor>& mask, bool has_cls, bool need_images) {
  check_inputs(images, weight, patch_size, mask);
  const int64_t dim = weight.size(0);
  const PatchGeometry g = geometry(images, patch_size);
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == weight.scalar_type() &&
                  grad.numel() == images.size(0) * (g.patches + has_cls) * dim,
              "patch_embed_cuda: grad must be a contiguous ", weight.scalar_type(), " [B, (1+)N, D] tensor");
  const c10::cuda::CUDAGuard guard(images.device());
  const auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor kept = at::empty({g.rows, dim}, weight.options());
  if (kept.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "patch_embed_kept_rows", [&] {
      kept_rows_kernel<scalar_t><<<blocks_for(kept.numel()), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), optional_ptr<bool>(mask), kept.data_ptr<scalar_t>(), g.rows, g.patches, dim,
          static_cast<int>(has_cls));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor d_weight =
      at::mm(kept.t(), gather_patches(images, weight, patch_size, mask)).view(weight.sizes());
  const at::Tensor d_bias = at::sum(kept, at::IntArrayRef{0}, false, at::kFloat);
  at::Tensor d_token = at::empty({0}, weight.options().dtype(at::kFloat));
  if (mask.has_value()) {
    // Every patch row's gradient goes either to the bias (kept) or to the mask token (masked).
    const at::Tensor patch_grad = grad.view({images.size(0), g.patches + has_cls, dim}).narrow(1, has_cls, g.patches);
    d_token = at::sum(patch_grad, at::IntArrayRef{0, 1}, false, at::kFloat).sub(d_bias);
  }
  at::Tensor d_images = at::empty({0}, images.options());
  if (need_images) {
    d_images = at::empty_like(images);
    const at::Tensor d_patches = at::mm(kept, weight.view({dim, g.cols}));
    if (d_patches.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "scatter_patches", [&] {
        using grad_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "scatter_patches", [&] {
          scatter_patches_kernel<grad_t, scalar_t><<<blocks_for(d_patches.numel()), kThreads, 0, stream>>>(
              d_patches.data_ptr<grad_t>(), d_images.data_ptr<scalar_t>(), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  }
  return {d_images, d_weight, d_bias, d_token};
}

}  // namespace
}  // namespace beitfast

TORCH_LIBRARY_FRAGMENT(beitfast, m) {
  m.def(
      "patch_embed_fwd_cuda(Tensor images, Tensor weight, Tensor? bias, int patch_size, Tensor? mask, "
      "Tensor? mask_token, Tensor? cls_token, Tensor? pos_embed) -> Tensor");
  m.def(
      "patch_embed_bwd_cuda(Tensor grad, Tensor images, Tensor weight, int patch_size, Tensor? mask, "
      "bool has_cls, bool need_images) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(beitfast, CUDA, m) {
  m.impl("patch_embed_fwd_cuda", &beitfast::patch_embed_fwd_cuda);
  m.impl("patch_embed_bwd_cuda", &beitfast::patch_embed_bwd_cuda);
}
