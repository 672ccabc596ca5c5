// CUDA backend of the masked-token cross-entropy of the LM head (Python side:
// beitfast/ops/cross_entropy.py, which wraps this op in the custom ops
// beitfast::lm_cross_entropy_{reduced,rows} with autograd and fake kernels; this op is only called
// from their implementations, never traced, so it needs no fake kernel of its own). The Triton backend
// (kernels/cross_entropy.py) is the same design with the same contract.
//
// Rows go in chunks of chunk_rows, which the Python side chooses by the rule of both backends
// (beitfast/ops/cross_entropy.py: rows_per_chunk, a logits-memory budget). Per chunk:
//   gather the rows of hidden (any strides) into a [C, D] buffer in the compute dtype
//   -> cuBLAS GEMM (+ bias) into a [C, V] logits buffer in the compute dtype (as the eager linear)
//   -> one block per row: max, log-sum-exp, loss, argmax hit, and (when gradients are asked) the
//      logits overwritten by their gradient (softmax - onehot) * row_scale (zeros on uncounted rows)
//   -> dW = dlogits^T @ rows into the fp32 [V, D] gradient (cuBLAS with fp32 output, no 16-bit
//      temporary; the first chunk writes it without reading, later chunks add to it), db the same with
//      column sums, dhidden rows = dlogits @ W stored into their [B, N, D] rows.
// No atomics: deterministic. No host sync: the row count (row_count, with an upper bound R) stays on
// the device and the custom kernels read it; the cuBLAS GEMMs take host sizes, so they cover all R rows
// (rows past the count are zeros with ignore_index labels: the result is the same, the work is not).
// A counted label outside [0, V) is treated as ignored (never an out-of-bounds read); the Python side
// counts such rows.
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

constexpr int kCopyThreads = 128;
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

// Rows of the plan that exist: the device-side count, or all of them.
__device__ int64_t live_rows(const int64_t* row_count, int64_t rows) {
  return row_count != nullptr ? min(max(*row_count, int64_t{0}), rows) : rows;
}

// One block per row of the chunk; rows past the count become zeros (finite logits, zero gradient).
template <typename in_t, typename out_t>
__global__ void gather_rows_kernel(const in_t* __restrict__ hidden, RowSource source, const int64_t* row_count,
                                   int64_t rows, int64_t first, int64_t dim, out_t* __restrict__ out) {
  const int64_t r = first + blockIdx.x;
  out_t* dst = out + static_cast<int64_t>(blockIdx.x) * dim;
  if (r >= live_rows(row_count, rows)) {
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = out_t(0.f);
    return;
  }
  const in_t* src = hidden + source.offset(r);
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    dst[d] = static_cast<out_t>(static_cast<float>(src[d * source.stride_d]));
  }
}

// One block per row of the chunk: row r of the GEMM output into its [B, N, D] row of grad_hidden.
template <typename in_t, typename out_t>
__global__ void scatter_rows_kernel(const in_t* __restrict__ rows_in, RowSource source, const int64_t* row_count,
                                    int64_t rows, int64_t first, int64_t dim, out_t* __restrict__ grad_hidden) {
  const int64_t r = first + blockIdx.x;
  if (r >= live_rows(row_count, rows)) return;
  const in_t* src = rows_in + static_cast<int64_t>(blockIdx.x) * dim;
  out_t* dst = grad_hidden + source.flat(r) * dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = static_cast<out_t>(static_cast<float>(src[d]));
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
// (softmax - onehot) * row_scale[row * scale_stride], zeros on rows that do not count. Rows past the
// count get loss 0 and no hit.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    row_loss_kernel(scalar_t* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ labels,
                    const int64_t* row_count, int64_t rows, int64_t first, int64_t ignore_index,
                    const float* __restrict__ row_scale, int64_t scale_stride, float* __restrict__ loss,
                    bool* __restrict__ hits) {
  const int64_t row = first + blockIdx.x;
  scalar_t* x = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  const bool live = row < live_rows(row_count, rows);
  const int64_t label = live ? labels[row] : ignore_index;
  const bool counted = live && label != ignore_index && label >= 0 && label < vocab;
  if (!counted) {
    // Uniform over the block: no thread reaches block_merge's barriers.
    if (threadIdx.x == 0) {
      loss[row] = 0.f;
      hits[row] = false;
    }
    if (row_scale != nullptr) {
      for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) x[j] = scalar_t(0.f);
    }
    return;
  }
  // Read before block_merge's barriers, hence before any thread overwrites the row.
  const float label_logit = threadIdx.x == 0 ? static_cast<float>(x[label]) : 0.f;

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
    loss[row] = lse - label_logit;
    hits[row] = acc.arg == label;
  }
  if (row_scale == nullptr) return;
  const float scale = row_scale[row * scale_stride];
  for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) {
    const float p = expf(static_cast<float>(x[j]) - lse);
    x[j] = static_cast<scalar_t>((p - (j == label ? 1.f : 0.f)) * scale);
  }
}

// grad_weight [V, D] (fp32) = dlogits[C, V]^T @ rows[C, D] (first chunk: beta 0, the uninitialised
// gradient is not read) or += it (later chunks), by one cuBLAS GEMM with fp32 output: no temporary in
// the compute dtype, the sum over chunks exact to fp32.
void weight_grad(at::Tensor& grad_weight, const at::Tensor& dlogits, const at::Tensor& rows, bool first) {
  const double beta = first ? 0.0 : 1.0;
  if (rows.scalar_type() == at::kFloat) {
    at::addmm_out(grad_weight, grad_weight, dlogits.t(), rows, beta, 1.0);
  } else {
    at::addmm_out(grad_weight, grad_weight, dlogits.t(), rows, at::kFloat, beta, 1.0);
  }
}

unsigned int row_threads(int64_t dim) {
  return static_cast<unsigned int>(std::clamp<int64_t>((dim + 31) / 32 * 32, 32, kCopyThreads));
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
  TORCH_CHECK(!row_count.has_value() || (row_count->numel() == 1 && row_count->scalar_type() == at::kLong),
              name, ": row_count must be one int64 value, got ", row_count->scalar_type(), " ", row_count->sizes());
  TORCH_CHECK(!row_scale.has_value() ||
                  (row_scale->scalar_type() == at::kFloat && (row_scale->numel() == 1 || row_scale->numel() == rows)),
              name, ": row_scale must be float32 with 1 or R=", rows, " values");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lm_cross_entropy_chunked_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_labels, const std::optional<at::Tensor>& source_rows,
    const std::optional<at::Tensor>& row_count, const std::optional<at::Tensor>& row_scale, int64_t ignore_index,
    at::ScalarType compute_dtype, int64_t chunk_rows) {
  check_inputs(hidden, weight, bias, row_labels, source_rows, row_count, row_scale);
  TORCH_CHECK(chunk_rows > 0, "lm_cross_entropy_chunked: chunk_rows must be > 0, got ", chunk_rows);
  const c10::cuda::CUDAGuard guard(hidden.device());
  // The compute dtype is already chosen; the GEMMs below must not be recast by an enclosing autocast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t rows = row_labels.size(0), vocab = weight.size(0), dim = weight.size(1);
  const bool with_grad = row_scale.has_value();
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32);
  at::Tensor hits = at::empty({rows}, hidden.options().dtype(at::kBool));
  at::Tensor grad_hidden = with_grad ? at::zeros(hidden.sizes(), hidden.options()) : at::empty({0}, hidden.options());
  // fp32, written whole by the first chunk (zeros only when there are no rows); for fp32 parameters
  // they are the gradients themselves.
  const auto make = [&](at::IntArrayRef size) { return rows == 0 ? at::zeros(size, f32) : at::empty(size, f32); };
  at::Tensor grad_weight = with_grad ? make({vocab, dim}) : at::empty({0}, weight.options());
  const bool bias_grad = with_grad && bias.has_value();
  at::Tensor grad_bias = bias_grad ? make({vocab}) : at::empty({0}, f32);
  auto finish = [&] {
    return std::make_tuple(loss, hits, grad_hidden, with_grad ? grad_weight.to(weight.scalar_type()) : grad_weight,
                           bias_grad ? grad_bias.to(bias->scalar_type()) : grad_bias);
  };
  if (rows == 0) return finish();

  // Cast once per call (no copy when already in the compute dtype and contiguous).
  const at::Tensor weight_c = weight.to(compute_dtype).contiguous();
  const std::optional<at::Tensor> bias_c =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(compute_dtype)) : std::nullopt;
  const at::Tensor labels = row_labels.contiguous();
  const std::optional<at::Tensor> sources =
      source_rows.has_value() ? std::optional<at::Tensor>(source_rows->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> scales =
      with_grad ? std::optional<at::Tensor>(row_scale->contiguous()) : std::nullopt;
  const int64_t scale_stride = with_grad && scales->numel() > 1 ? 1 : 0;
  const int64_t* count = row_count.has_value() ? row_count->const_data_ptr<int64_t>() : nullptr;

  const RowSource source{sources.has_value() ? sources->const_data_ptr<int64_t>() : nullptr, hidden.size(1),
                         hidden.stride(0), hidden.stride(1), hidden.stride(2)};
  const int64_t chunk = std::min(chunk_rows, rows);
  const auto compute = hidden.options().dtype(compute_dtype);
  at::Tensor row_buffer = at::empty({chunk, dim}, compute);
  at::Tensor logits_buffer = at::empty({chunk, vocab}, compute);

  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t size = std::min(chunk, rows - first);
    const auto blocks = static_cast<unsigned int>(size);
    at::Tensor gathered = row_buffer.narrow(0, 0, size);
    at::Tensor logits = logits_buffer.narrow(0, 0, size);

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "gather_rows", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compute_dtype, "gather_rows_out", [&] {
        gather_rows_kernel<in_t, scalar_t><<<blocks, row_threads(dim), 0, stream>>>(
            hidden.const_data_ptr<in_t>(), source, count, rows, first, dim, gathered.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });

    if (bias_c.has_value()) {
      at::addmm_out(logits, *bias_c, gathered, weight_c.t());
    } else {
      at::mm_out(logits, gathered, weight_c.t());
    }

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compute_dtype, "row_loss", [&] {
      row_loss_kernel<scalar_t><<<blocks, kRowThreads, 0, stream>>>(
          logits.mutable_data_ptr<scalar_t>(), vocab, labels.const_data_ptr<int64_t>(), count, rows, first,
          ignore_index, with_grad ? scales->const_data_ptr<float>() : nullptr, scale_stride,
          loss.mutable_data_ptr<float>(), hits.mutable_data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (!with_grad) continue;

    // `logits` now holds dlogits. The weight gradient reads the gathered rows before the hidden
    // gradient overwrites them.
    const bool first_chunk = first == 0;
    weight_grad(grad_weight, logits, gathered, first_chunk);
    if (bias_grad) {
      if (first_chunk) {
        at::sum_out(grad_bias, logits, at::IntArrayRef{0}, false, at::kFloat);
      } else {
        grad_bias.add_(at::sum(logits, at::IntArrayRef{0}, false, at::kFloat));
      }
    }
    at::mm_out(gathered, logits, weight_c);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compute_dtype, "scatter_rows", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "scatter_rows_out", [&] {
        scatter_rows_kernel<in_t, scalar_t><<<blocks, row_threads(dim), 0, stream>>>(
            gathered.const_data_ptr<in_t>(), source, count, rows, first, dim,
            grad_hidden.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return finish();
}

}  // namespace beitfast

TORCH_LIBRARY_FRAGMENT(beitfast, m) {
  m.def(
      "lm_cross_entropy_chunked(Tensor hidden, Tensor weight, Tensor? bias, Tensor row_labels, "
      "Tensor? source_rows, Tensor? row_count, Tensor? row_scale, int ignore_index, ScalarType compute_dtype, "
      "int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(beitfast, CUDA, m) {
  m.impl("lm_cross_entropy_chunked", &beitfast::lm_cross_entropy_chunked_cuda);
}
