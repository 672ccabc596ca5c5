// CUDA backend of the masked-token cross-entropy of the LM head (Python side:
// beitfast/ops/cross_entropy.py, which wraps this op in the custom ops
// beitfast::lm_cross_entropy_cuda_{reduced,rows} with autograd and fake kernels; this op is only called
// from their implementations, never traced, so it needs no fake kernel of its own).
//
// Chunked design: the selected rows go in chunks of at most a tenth of them. Per chunk:
//   gather the rows of hidden (any strides) into a [C, D] buffer in the compute dtype
//   -> cuBLAS GEMM (+ bias) into a [C, V] logits buffer in the compute dtype (as the eager linear)
//   -> one kernel per row: max, log-sum-exp, loss, argmax hit, and (when gradients are asked) the
//      logits overwritten by their gradient (softmax - onehot) * row_scale
//   -> dW += dlogits^T @ rows (fp32 accumulator, cuBLAS), db += column sums (fp32),
//      dhidden rows = dlogits @ W, scattered back to their [B, N] positions.
// The row scale (1 / count for a mean, 1 for a sum, or per-row upstream gradients) is a device tensor.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace beitfast {
namespace {

constexpr int kCopyThreads = 256;
constexpr int kRowThreads = 256;
constexpr int kWarps = kRowThreads / 32;

// Where row r of the plan lies in hidden [B, N, D].
struct RowSource {
  const int64_t* source_rows;  // nullptr: row r is row r of hidden flattened over [B, N]
  int64_t seq;                 // N
  int64_t stride_b, stride_n, stride_d;

  __device__ int64_t flat(int64_t r) const { return source_rows != nullptr ? source_rows[r] : r; }
  __device__ int64_t offset(int64_t r) const {
    const int64_t s = flat(r), b = s / seq;
    return b * stride_b + (s - b * seq) * stride_n;
  }
};

unsigned int copy_blocks(int64_t n) {
  // A grid-stride loop covers the rest.
  return static_cast<unsigned int>(std::clamp<int64_t>((n + kCopyThreads - 1) / kCopyThreads, 1, 65535 * 8));
}

template <typename in_t, typename out_t>
__global__ void gather_rows_kernel(const in_t* __restrict__ hidden, RowSource source, int64_t first,
                                   int64_t count, int64_t dim, out_t* __restrict__ rows) {
  const int64_t n = count * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dim, d = i - r * dim;
    rows[i] = static_cast<out_t>(static_cast<float>(hidden[source.offset(first + r) + d * source.stride_d]));
  }
}

template <typename in_t, typename out_t>
__global__ void scatter_rows_kernel(const in_t* __restrict__ rows, RowSource source, int64_t first,
                                    int64_t count, int64_t dim, out_t* __restrict__ grad_hidden) {
  const int64_t n = count * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dim, d = i - r * dim;
    grad_hidden[source.flat(first + r) * dim + d] = static_cast<out_t>(static_cast<float>(rows[i]));
  }
}

// Running maximum, sum of exp(x - max) and first index of the maximum.
struct MaxSum {
  float max;
  float sum;
  int64_t arg;
};

__device__ MaxSum merge(const MaxSum& a, const MaxSum& b) {
  MaxSum out;
  out.max = fmaxf(a.max, b.max);
  out.sum = out.max == -INFINITY ? 0.f : a.sum * expf(a.max - out.max) + b.sum * expf(b.max - out.max);
  // Ties go to the lower index, as torch.argmax.
  out.arg = a.max > b.max ? a.arg : (b.max > a.max ? b.arg : min(a.arg, b.arg));
  return out;
}

__device__ MaxSum warp_merge(MaxSum v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset),
                       __shfl_xor_sync(0xffffffffu, v.arg, offset)};
    v = merge(v, other);
  }
  return v;
}

// The merge over the block, returned to every thread.
__device__ MaxSum block_merge(MaxSum v) {
  __shared__ MaxSum per_warp[kWarps];
  __shared__ MaxSum total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_merge(v);
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? per_warp[lane] : MaxSum{-INFINITY, 0.f, INT64_MAX};
    v = warp_merge(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// One block per row of the chunk. With row_scale, the row's logits are overwritten by
// (softmax - onehot) * row_scale[row * scale_stride] (zeros on rows that do not count).
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    row_loss_kernel(scalar_t* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ labels,
                    int64_t ignore_index, const float* __restrict__ row_scale, int64_t scale_stride,
                    float* __restrict__ loss, bool* __restrict__ hits) {
  const int64_t row = blockIdx.x;
  scalar_t* x = logits + row * vocab;
  const int64_t label = labels[row];
  const bool counted = label != ignore_index;
  // Read before block_merge's barriers, hence before any thread overwrites the row.
  const float label_logit = (threadIdx.x == 0 && counted) ? static_cast<float>(x[label]) : 0.f;

  MaxSum acc{-INFINITY, 0.f, vocab};
  for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) {
    const float v = static_cast<float>(x[j]);
    if (v > acc.max) {
      acc.sum = acc.sum * expf(acc.max - v) + 1.f;
      acc.max = v;
      acc.arg = j;
    } else {
      acc.sum += expf(v - acc.max);
    }
  }
  acc = block_merge(acc);
  const float lse = acc.max + logf(acc.sum);
  if (threadIdx.x == 0) {
    loss[row] = counted ? lse - label_logit : 0.f;
    hits[row] = counted && acc.arg == label;
  }
  if (row_scale == nullptr) return;
  const float scale = counted ? row_scale[row * scale_stride] : 0.f;
  for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) {
    const float p = expf(static_cast<float>(x[j]) - lse);
    x[j] = static_cast<scalar_t>((p - (j == label ? 1.f : 0.f)) * scale);
  }
}

// grad_weight [V, D] (fp32) += dlogits[C, V]^T @ rows[C, D]. The chunk's product comes from an ATen
// GEMM (cuBLAS) in the compute dtype, as autocast's eager linear computes the whole weight gradient; the
// sum over chunks is kept in fp32. (cuBLAS entry points with an fp32 output are not exported by torch.)
void accumulate_weight_grad(at::Tensor& grad_weight, const at::Tensor& dlogits, const at::Tensor& rows) {
  grad_weight.add_(at::mm(dlogits.t(), rows));
}

// Rows per chunk: at most a tenth of them (the logits buffer stays under a tenth of the full logits),
// in multiples of 64 for the GEMM tiles, and never fewer than 128 (small problems run in one chunk).
int64_t chunk_rows(int64_t rows) {
  const int64_t tenth = (rows + 9) / 10;
  return std::min(rows, std::max<int64_t>(128, tenth / 64 * 64));
}

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& row_labels, const std::optional<at::Tensor>& source_rows,
                  const std::optional<at::Tensor>& row_count, const std::optional<at::Tensor>& row_scale) {
  const char* name = "lm_cross_entropy_chunked";
  TORCH_CHECK(hidden.is_cuda() && hidden.dim() == 3, name, ": hidden must be a CUDA [B, N, D] tensor, got ",
              hidden.device(), " ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(2), name, ": weight must be [V, D=",
              hidden.size(2), "], got ", weight.sizes());
  TORCH_CHECK(!bias.has_value() || bias->sizes() == at::IntArrayRef{weight.size(0)}, name,
              ": bias must be [V=", weight.size(0), "], got ", bias->sizes());
  TORCH_CHECK(row_labels.dim() == 1 && row_labels.scalar_type() == at::kLong, name,
              ": row_labels must be int64 [R], got ", row_labels.scalar_type(), " ", row_labels.sizes());
  const int64_t rows = row_labels.size(0);
  TORCH_CHECK(!source_rows.has_value() ||
                  (source_rows->scalar_type() == at::kLong && source_rows->sizes() == at::IntArrayRef{rows}),
              name, ": source_rows must be int64 [R=", rows, "]");
  TORCH_CHECK(source_rows.has_value() || rows <= hidden.size(0) * hidden.size(1), name,
              ": without source_rows, R=", rows, " exceeds hidden's B*N rows");
  TORCH_CHECK(!row_count.has_value() || row_count->numel() == 1, name, ": row_count must hold one value");
  TORCH_CHECK(!row_scale.has_value() ||
                  (row_scale->scalar_type() == at::kFloat && (row_scale->numel() == 1 || row_scale->numel() == rows)),
              name, ": row_scale must be float32 with 1 or R=", rows, " values");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lm_cross_entropy_chunked_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_labels, const std::optional<at::Tensor>& source_rows,
    const std::optional<at::Tensor>& row_count, const std::optional<at::Tensor>& row_scale, int64_t ignore_index,
    at::ScalarType compute_dtype) {
  check_inputs(hidden, weight, bias, row_labels, source_rows, row_count, row_scale);
  const c10::cuda::CUDAGuard guard(hidden.device());
  // The compute dtype is already chosen; the GEMMs below must not be recast by an enclosing autocast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t rows = row_labels.size(0), vocab = weight.size(0), dim = weight.size(1);
  const bool with_grad = row_scale.has_value();
  // The GEMM sizes are host values: with an upper bound R, the true count is read once (the cuBLAS
  // calls need it). Under CUDA-graph capture no read is possible: all R rows run (the rows past the
  // count carry ignore_index, so the result is the same, only slower).
  int64_t live = rows;
  if (row_count.has_value() && rows > 0 && !stream_is_capturing(stream)) {
    live = std::clamp<int64_t>(row_count->item<int64_t>(), 0, rows);
  }

  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({rows}, f32);
  at::Tensor hits = at::zeros({rows}, hidden.options().dtype(at::kBool));
  at::Tensor grad_hidden = with_grad ? at::zeros(hidden.sizes(), hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor grad_weight = with_grad ? at::zeros({vocab, dim}, f32) : at::empty({0}, weight.options());
  const bool bias_grad = with_grad && bias.has_value();
  at::Tensor grad_bias = bias_grad ? at::zeros({vocab}, f32) : at::empty({0}, f32);
  if (live == 0) {
    return {loss, hits, grad_hidden, grad_weight.to(weight.scalar_type()),
            bias_grad ? grad_bias.to(bias->scalar_type()) : grad_bias};
  }

  const at::Tensor weight_c = weight.to(compute_dtype).contiguous();
  const std::optional<at::Tensor> bias_c =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(compute_dtype)) : std::nullopt;
  const at::Tensor labels = row_labels.contiguous();
  const std::optional<at::Tensor> sources =
      source_rows.has_value() ? std::optional<at::Tensor>(source_rows->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> scales =
      with_grad ? std::optional<at::Tensor>(row_scale->contiguous()) : std::nullopt;
  const int64_t scale_stride = with_grad && scales->numel() > 1 ? 1 : 0;

  const RowSource source{sources.has_value() ? sources->const_data_ptr<int64_t>() : nullptr, hidden.size(1),
                         hidden.stride(0), hidden.stride(1), hidden.stride(2)};
  const int64_t chunk = chunk_rows(live);
  const auto compute = hidden.options().dtype(compute_dtype);
  at::Tensor row_buffer = at::empty({chunk, dim}, compute);
  at::Tensor logits_buffer = at::empty({chunk, vocab}, compute);

  for (int64_t first = 0; first < live; first += chunk) {
    const int64_t count = std::min(chunk, live - first);
    at::Tensor chunk_rows_c = row_buffer.narrow(0, 0, count);
    at::Tensor logits = logits_buffer.narrow(0, 0, count);

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "gather_rows", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compute_dtype, "gather_rows_out", [&] {
        gather_rows_kernel<in_t, scalar_t><<<copy_blocks(count * dim), kCopyThreads, 0, stream>>>(
            hidden.const_data_ptr<in_t>(), source, first, count, dim, chunk_rows_c.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });

    if (bias_c.has_value()) {
      at::addmm_out(logits, *bias_c, chunk_rows_c, weight_c.t());
    } else {
      at::mm_out(logits, chunk_rows_c, weight_c.t());
    }

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compute_dtype, "row_loss", [&] {
      row_loss_kernel<scalar_t><<<static_cast<unsigned int>(count), kRowThreads, 0, stream>>>(
          logits.mutable_data_ptr<scalar_t>(), vocab, labels.const_data_ptr<int64_t>() + first, ignore_index,
          with_grad ? scales->const_data_ptr<float>() + first * scale_stride : nullptr, scale_stride,
          loss.mutable_data_ptr<float>() + first, hits.mutable_data_ptr<bool>() + first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (!with_grad) continue;

    // `logits` now holds dlogits. The weight gradient reads the gathered rows before the hidden
    // gradient overwrites them.
    accumulate_weight_grad(grad_weight, logits, chunk_rows_c);
    if (bias_grad) grad_bias.add_(at::sum(logits, {0}, false, at::kFloat));
    at::mm_out(chunk_rows_c, logits, weight_c);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compute_dtype, "scatter_rows", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "scatter_rows_out", [&] {
        scatter_rows_kernel<in_t, scalar_t><<<copy_blocks(count * dim), kCopyThreads, 0, stream>>>(
            chunk_rows_c.const_data_ptr<in_t>(), source, first, count, dim, grad_hidden.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {loss, hits, grad_hidden, with_grad ? grad_weight.to(weight.scalar_type()) : grad_weight,
          bias_grad ? grad_bias.to(bias->scalar_type()) : grad_bias};
}

}  // namespace beitfast

TORCH_LIBRARY_FRAGMENT(beitfast, m) {
  m.def(
      "lm_cross_entropy_chunked(Tensor hidden, Tensor weight, Tensor? bias, Tensor row_labels, "
      "Tensor? source_rows, Tensor? row_count, Tensor? row_scale, int ignore_index, ScalarType compute_dtype) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(beitfast, CUDA, m) {
  m.impl("lm_cross_entropy_chunked", &beitfast::lm_cross_entropy_chunked_cuda);
}
