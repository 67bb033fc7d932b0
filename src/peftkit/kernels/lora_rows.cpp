// Mixed-adapter LoRA on the CPU, each row through its own adapter's slot of the stacked factors, read in place.
//
//   y[rows[j]] += scale[s] * B[s] (A[s] x[rows[j]])      s = slots[j]
//
// x: (R, in)   y: (R, out)   A: (S, r, in)   B: (S, r, out), each adapter's B transposed (see add_B)
// rows (absent: every row in turn), slots: (n,) int64
// (x and y may carry more axes of size 1 between, as (R, 1, in): a decode step's rows, taken as they come)
// scale: (S,) in the accumulation dtype: float64 for float64 factors, float32 for the rest
// ranks: (S,) int64, each slot's own rank (absent: r for every slot). Stacks are padded to the largest rank among
// their adapters, with zeros; a slot's padding is skipped, not computed: one r=64 adapter among r=8 ones would
// otherwise make every row cost r=64's reads.
//
// Why a kernel: the Python path copies each row's factors out of the stacks (index_select) and then runs two
// batched matmuls over the copies, so a decode step reads and writes every row's factors twice more than the
// update needs (about 200 MiB per 16-row step of 12 mixed SmolLM2-135M adapters). Here each row's factors are read
// once, straight from their slot: that is Punica's and vLLM's BGMV ("batched gather matrix-vector") on the CPU.
// The update is memory-bound (a rank-r matrix-vector product), so plain loops that the compiler vectorizes are
// as fast as the hardware allows; accumulation is in float32 (float64 for float64 factors).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

// y[o] += sum_k h[k] B[k, o] for o in [begin, end), B row-major (r, out): one multiply-add along the outputs per
// rank, which the compiler vectorizes for any r. The stacks hold B transposed for this: with B as (out, r), each
// output needed a dot product of length r, which vectorizes badly at small r (a horizontal reduction per output, or
// r-strided gathers), and this half of the update took 3-6x its time now at r = 6, 12, 32 or 40 (at r = 4, 8, 16,
// with loops unrolled per rank, about 5-15% more; SmolLM2-135M's shapes, AMD EPYC).
template <typename W, typename Acc, typename Y>
void add_B(const W* Bs, const Acc* h, Y* yr, int64_t r, int64_t out, int64_t begin, int64_t end) {
  constexpr int64_t T = 256;  // outputs per tile, summed in Acc on the stack before y is touched
  Acc acc[T];
  for (int64_t o0 = begin; o0 < end; o0 += T) {
    const int64_t len = std::min(T, end - o0);
    for (int64_t t = 0; t < len; ++t) acc[t] = 0;
    for (int64_t k = 0; k < r; ++k) {
      const Acc hk = h[k];
      const W* bk = Bs + k * out + o0;
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) acc[t] += hk * static_cast<Acc>(bk[t]);
    }
    for (int64_t t = 0; t < len; ++t) yr[o0 + t] = static_cast<Y>(static_cast<at::opmath_type<Y>>(yr[o0 + t]) + acc[t]);
  }
}

template <typename W, typename Y>
void lora_rows_impl(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& scale, const int64_t* rp, const at::Tensor& slots, const int64_t* kp) {
  const int64_t n = slots.numel(), in = x.size(-1), out = y.size(-1), r = A.size(1);
  using Acc = at::opmath_type<W>;
  const W* xp = x.data_ptr<W>();
  const W* Ap = A.data_ptr<W>();
  const W* Bp = B.data_ptr<W>();
  const Acc* sp = scale.data_ptr<Acc>();
  const int64_t* ip = slots.data_ptr<int64_t>();
  Y* yp = y.data_ptr<Y>();
  // h[j, k] = scale[s] * <A[s, k], x[rows[j]]>: one dot product of length `in` per item
  std::vector<Acc> h(n * r);
  at::parallel_for(0, n * r, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / r, k = item % r, s = ip[j];
      if (kp && k >= kp[s]) {  // (a padded rank of this slot: zero, never read)
        h[item] = 0;
        continue;
      }
      const W* a = Ap + (s * r + k) * in;
      const W* xr = xp + (rp ? rp[j] : j) * in;
      Acc acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < in; ++c) acc += static_cast<Acc>(a[c]) * static_cast<Acc>(xr[c]);
      h[item] = acc * sp[s];
    }
  });
  // y[rows[j], o] += sum_k h[j, k] B[s, k, o]: the output features are split between threads, so that each thread reads
  // its part of every row's B once
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t s = ip[j];
      add_B(Bp + s * r * out, h.data() + j * r, yp + (rp ? rp[j] : j) * out, kp ? kp[s] : r, out, begin, end);
    }
  });
}

void lora_rows_(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                const std::optional<at::Tensor>& rows, const at::Tensor& slots, const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK(x.dim() >= 2 && y.dim() == x.dim() && A.dim() == 3 && B.dim() == 3 &&
                  x.numel() == x.size(0) * x.size(-1) && y.numel() == y.size(0) * y.size(-1),
              "lora_rows_: x, y must be (rows, [1, ...,] features), A, B 3-D");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && A.is_contiguous() && B.is_contiguous() &&
                  scale.is_contiguous() && (!rows || rows->is_contiguous()) && slots.is_contiguous() &&
                  (!ranks || ranks->is_contiguous()),
              "lora_rows_: every tensor must be contiguous");
  TORCH_CHECK(x.scalar_type() == A.scalar_type() && B.scalar_type() == A.scalar_type(),
              "lora_rows_: x, A and B must share a dtype");
  TORCH_CHECK(scale.scalar_type() == (A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "lora_rows_: scale must be float64 for float64 factors, else float32");
  TORCH_CHECK((!rows || rows->scalar_type() == at::kLong) && slots.scalar_type() == at::kLong &&
                  (!ranks || ranks->scalar_type() == at::kLong),
              "lora_rows_: rows, slots and ranks must be int64");
  TORCH_CHECK(x.size(0) == y.size(0) && A.size(2) == x.size(-1) && B.size(2) == y.size(-1) &&
                  B.size(1) == A.size(1) && B.size(0) == A.size(0) && scale.numel() == A.size(0) &&
                  (rows ? rows->numel() == slots.numel() : slots.numel() == x.size(0)) &&
                  (!ranks || ranks->numel() == A.size(0)),
              "lora_rows_: shapes do not agree");
  const int64_t* rp = rows ? rows->data_ptr<int64_t>() : nullptr;
  for (int64_t j = 0; j < slots.numel(); ++j) {  // (a bad index would write outside y: check, it costs nothing)
    const int64_t row = rp ? rp[j] : j, slot = slots.data_ptr<int64_t>()[j];
    TORCH_CHECK(row >= 0 && row < x.size(0) && slot >= 0 && slot < A.size(0), "lora_rows_: row or slot out of range");
  }
  const int64_t* kp = ranks ? ranks->data_ptr<int64_t>() : nullptr;
  for (int64_t s = 0; kp && s < A.size(0); ++s) TORCH_CHECK(kp[s] >= 0 && kp[s] <= A.size(1), "lora_rows_: a rank out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "lora_rows_", [&] {
    using W = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lora_rows_", [&] {
      lora_rows_impl<W, scalar_t>(y, x, A, B, scale, rp, slots, kp);
    });
  });
}

}  // namespace

TORCH_LIBRARY(peftkit, m) {
  m.def("lora_rows_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor? rows, Tensor slots, Tensor? ranks=None) -> ()");
}

TORCH_LIBRARY_IMPL(peftkit, CPU, m) { m.impl("lora_rows_", lora_rows_); }
