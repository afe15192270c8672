// CPU kernels of the squared-error reconstruction loss 1/2 ||x_hat - x||^2, forward and backward.
//
// Forward: one pass reads x_hat and x and reduces the loss; when asked (save_grad_unit), the same
// pass also writes scale * (x_hat - x), the gradient for an incoming gradient of 1, so that the
// backward of the usual `loss.backward()` needs no pass at all (DESIGN.md section 3, CPU note).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "../elbo_math.h"
#include "../fastelbo.h"
#include "cpu_common.h"

namespace fastelbo {
namespace cpu {
namespace {

// Each block of kBlock elements is summed in kLanes independent lanes (lane l takes the elements
// whose index in the block is l mod kLanes), which breaks the add dependency chain and lets the
// compiler emit packed instructions; the lanes are then combined in a fixed order and the block
// sums cascaded (CascadeSum) for torch.sum-like accuracy. Deterministic.
//
// The lanes are held as kLanes / kPerVector vectors of 16 bytes (GCC vector extension), the width
// every x86-64 (SSE2) and AArch64 (NEON) target has in registers. A single 32-byte vector, wider
// than the baseline x86-64 target, is kept in memory by GCC: a store-to-load chain per iteration
// that made this loop 2-3x slower than torch.dot on cache-resident data.
constexpr int kLanes = 8;
constexpr int64_t kBlock = kLanes * 16;

template <typename acc_t>
struct LaneVectors {
  typedef acc_t Vector __attribute__((vector_size(16)));
  static constexpr int kPerVector = static_cast<int>(16 / sizeof(acc_t));
  static constexpr int kVectors = kLanes / kPerVector;
  static_assert(kVectors * kPerVector == kLanes, "kLanes must fill whole vectors");

  static Vector load(const acc_t* p) {
    Vector v;
    std::memcpy(&v, p, sizeof(Vector));  // one unaligned vector load
    return v;
  }
  static void store(const Vector& v, acc_t* p) { std::memcpy(p, &v, sizeof(Vector)); }
};

// The loss of the n <= kBlock elements at x_hat, x (already acc_t) summed in the kLanes lanes, the
// lanes then added in order; writes grad_scale * (x_hat - x) to grad when kSaveGradUnit.
template <bool kSaveGradUnit, typename acc_t>
__attribute__((always_inline)) inline acc_t recon_block_sum(const acc_t* x_hat, const acc_t* x, int64_t n, acc_t* grad, acc_t grad_scale) {
  using LV = LaneVectors<acc_t>;
  using Vector = typename LV::Vector;
  constexpr int kPerVector = LV::kPerVector, kVectors = LV::kVectors;
  const Vector grad_scale_vector = Vector{} + grad_scale;
  Vector lanes[kVectors] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 4
    for (int k = 0; k < kVectors; ++k) {
      const int64_t at = i + k * kPerVector;
      const Vector xh = LV::load(x_hat + at), xv = LV::load(x + at);
      lanes[k] += math::recon_element(xh, xv);
      if constexpr (kSaveGradUnit) LV::store(math::grad_x_hat_element(xh, xv, grad_scale_vector), grad + at);
    }
  }
  if (i < n) {  // the last (< kLanes) elements: lane l takes element i + l
    // Zero-padded copies: a padded lane adds recon_element(0, 0) = +0, which leaves it as is.
    acc_t tail_xh[kLanes] = {}, tail_xv[kLanes] = {};
    std::copy(x_hat + i, x_hat + n, tail_xh);
    std::copy(x + i, x + n, tail_xv);
#pragma GCC unroll 4
    for (int k = 0; k < kVectors; ++k) {
      lanes[k] += math::recon_element(LV::load(tail_xh + k * kPerVector), LV::load(tail_xv + k * kPerVector));
    }
    if constexpr (kSaveGradUnit) {
      for (int l = 0; i < n; ++i, ++l) grad[i] = math::grad_x_hat_element(tail_xh[l], tail_xv[l], grad_scale);
    }
  }
  acc_t block = 0;
  for (int k = 0; k < kVectors; ++k) {
    for (int e = 0; e < kPerVector; ++e) block += lanes[k][e];  // lanes 0, 1, ..., kLanes - 1
  }
  return block;
}

// The loss of elements [begin, end): block sums cascaded (CascadeSum). 16-bit data is converted a
// block at a time (as_acc / acc_out / store_acc) and computed in float.
template <bool kSaveGradUnit, typename scalar_t, typename acc_t>
acc_t recon_range_sum(const scalar_t* x_hat, const scalar_t* x, int64_t begin, int64_t end,
                      scalar_t* grad_unit, acc_t grad_scale) {
  CascadeSum<acc_t> total;
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t n = std::min(kBlock, end - i);
    acc_t xh_block[kBlock], xv_block[kBlock], grad_block[kBlock];
    acc_t* grad = kSaveGradUnit ? acc_out(grad_unit + i, grad_block) : nullptr;
    total.add(recon_block_sum<kSaveGradUnit>(as_acc(x_hat + i, n, xh_block), as_acc(x + i, n, xv_block), n, grad,
                                             grad_scale));
    if constexpr (kSaveGradUnit) store_acc(grad, n, grad_unit + i);
  }
  return total.sum();
}

// Per-sample losses (reduction "none") of samples shorter than kLanes elements, elements
// [begin, end) holding whole samples of D elements, into sums[0], sums[1], ...: a block at a time,
// each sample's elements added in order (recon_block_sum would pad every sample to a lane group
// and pay a block's set-up for a few elements). Writes grad_scale * (x_hat - x) to grad_unit when
// it is not null.
template <typename scalar_t, typename acc_t>
void recon_short_samples(const scalar_t* x_hat, const scalar_t* x, int64_t begin, int64_t end, int64_t D,
                         scalar_t* grad_unit, acc_t grad_scale, acc_t* sums) {
  SampleSums<acc_t> sample_sums(D, sums);
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t n = std::min(kBlock, end - i);
    acc_t xh_block[kBlock], xv_block[kBlock], loss[kBlock];
    const acc_t* xh = as_acc(x_hat + i, n, xh_block);
    const acc_t* xv = as_acc(x + i, n, xv_block);
    for (int64_t j = 0; j < n; ++j) loss[j] = math::recon_element(xh[j], xv[j]);
    if (grad_unit) {
      acc_t grad_block[kBlock];
      acc_t* grad = acc_out(grad_unit + i, grad_block);
      for (int64_t j = 0; j < n; ++j) grad[j] = math::grad_x_hat_element(xh[j], xv[j], grad_scale);
      store_acc(grad, n, grad_unit + i);
    }
    sample_sums.add(loss, n);
  }
}

// The incoming gradient (times the reduction's scale) of element i of a block: one value for the
// whole block, or one per element (reduction "none" over samples shorter than the block).
template <typename acc_t>
__attribute__((always_inline)) inline acc_t grad_rec_at(acc_t grad_rec, int64_t /*i*/) {
  return grad_rec;
}
template <typename acc_t>
__attribute__((always_inline)) inline acc_t grad_rec_at(const acc_t* grad_rec, int64_t i) {
  return grad_rec[i];
}

// grad_x_hat = grad_rec * (x_hat - x) and/or grad_x = -grad_x_hat for n elements in acc_t: one
// loop per combination, over pointers that do not alias (outputs are fresh tensors), so that it
// vectorizes plainly.
template <bool kGradXHat, bool kGradX, typename acc_t, typename GradRec>
__attribute__((always_inline)) inline void recon_backward_loop(const acc_t* __restrict__ x_hat, const acc_t* __restrict__ x,
                                                               int64_t n, GradRec grad_rec, acc_t* __restrict__ grad_x_hat,
                                                               acc_t* __restrict__ grad_x) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t grad = math::grad_x_hat_element(x_hat[i], x[i], grad_rec_at(grad_rec, i));
    if constexpr (kGradXHat) grad_x_hat[i] = grad;
    if constexpr (kGradX) grad_x[i] = -grad;
  }
}

// The same for the n <= kBlock elements at i of any dtype, each gradient written where its pointer
// is not null.
template <typename scalar_t, typename acc_t, typename GradRec>
void recon_backward_block(const scalar_t* x_hat, const scalar_t* x, int64_t i, int64_t n, GradRec grad_rec,
                          scalar_t* grad_x_hat, scalar_t* grad_x) {
  acc_t xh_block[kBlock], xv_block[kBlock], gxh_block[kBlock], gx_block[kBlock];
  const acc_t* xh = as_acc(x_hat + i, n, xh_block);
  const acc_t* xv = as_acc(x + i, n, xv_block);
  acc_t* gxh = grad_x_hat ? acc_out(grad_x_hat + i, gxh_block) : nullptr;
  acc_t* gx = grad_x ? acc_out(grad_x + i, gx_block) : nullptr;
  if (gxh && gx) {
    recon_backward_loop<true, true>(xh, xv, n, grad_rec, gxh, gx);
  } else if (gxh) {
    recon_backward_loop<true, false>(xh, xv, n, grad_rec, gxh, gx);
  } else if (gx) {
    recon_backward_loop<false, true>(xh, xv, n, grad_rec, gxh, gx);
  }
  if (gxh) store_acc(gxh, n, grad_x_hat + i);
  if (gx) store_acc(gx, n, grad_x + i);
}

// Elements [begin, end), all with the incoming gradient grad_rec, a block at a time.
template <typename scalar_t, typename acc_t>
void recon_backward_range(const scalar_t* x_hat, const scalar_t* x, int64_t begin, int64_t end, acc_t grad_rec,
                          scalar_t* grad_x_hat, scalar_t* grad_x) {
  for (int64_t i = begin; i < end; i += kBlock) {
    recon_backward_block<scalar_t, acc_t>(x_hat, x, i, std::min(kBlock, end - i), grad_rec, grad_x_hat, grad_x);
  }
}

// Reduction "none", elements [begin, end) holding whole samples of D < kLanes elements: a block at
// a time, each element's incoming gradient looked up by its sample (a recon_backward_range per
// sample cost more than the sample's few elements).
template <typename scalar_t, typename acc_t>
void recon_backward_short_samples(const scalar_t* x_hat, const scalar_t* x, int64_t begin, int64_t end, int64_t D,
                                  const acc_t* grad_loss, acc_t scale, scalar_t* grad_x_hat, scalar_t* grad_x) {
  for (int64_t i = begin, b = begin / D, filled = 0; i < end; i += kBlock) {
    const int64_t n = std::min(kBlock, end - i);
    acc_t grad_rec[kBlock];
    for (int64_t j = 0; j < n; ++j) {
      grad_rec[j] = grad_loss[b] * scale;
      if (++filled == D) {
        filled = 0;
        ++b;
      }
    }
    recon_backward_block<scalar_t, acc_t>(x_hat, x, i, n, static_cast<const acc_t*>(grad_rec), grad_x_hat, grad_x);
  }
}

std::tuple<at::Tensor, at::Tensor> gaussian_recon_loss_cpu(const at::Tensor& x_hat,
                                                           const at::Tensor& x, int64_t reduction,
                                                           bool save_grad_unit) {
  check_gaussian_recon_loss(x_hat, x, reduction);
  at::Tensor loss = allocate_recon_loss(x_hat, reduction);
  const ReconOperands rows = recon_operands(x_hat, x);
  at::Tensor grad_unit = save_grad_unit ? empty_output(x_hat.sizes(), rows.x_hat.strides(), x_hat.options())
                                        : at::empty({0}, x_hat.options());
  const BatchLayout layout = batch_layout(x_hat);
  const double scale = reduction_scale(reduction, layout);
  const BatchLayout work = task_layout(layout, reduction == kNone);
  const RowChunking chunking(work);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_hat.scalar_type(), "gaussian_recon_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xh = rows.x_hat.const_data_ptr<scalar_t>();
    const scalar_t* xv = rows.x.const_data_ptr<scalar_t>();
    scalar_t* gu = save_grad_unit ? grad_unit.data_ptr<scalar_t>() : nullptr;
    // An empty batch has no tasks: the reduction writes its identity, 0.
    const acc_t grad_scale = static_cast<acc_t>(scale);
    reduce_rows_into<acc_t>(chunking, work, reduction, scale, loss, [&](int64_t task, acc_t* sums) {
      if (reduction == kNone && layout.per_sample < kLanes) {  // a piece per sample of a few elements
        recon_short_samples(xh, xv, chunking.begin(task), chunking.end(task), layout.per_sample, gu, grad_scale, sums);
        return;
      }
      for (int64_t p = chunking.first_piece(task); p < chunking.end_piece(task); ++p) {
        const int64_t begin = chunking.piece_begin(p), end = chunking.piece_end(p);
        *sums++ = gu ? recon_range_sum<true>(xh, xv, begin, end, gu, grad_scale)
                     : recon_range_sum<false>(xh, xv, begin, end, gu, grad_scale);
      }
    });
  });
  return {loss, grad_unit};
}

// Writes the gradients for grad_loss into grad_x_hat and grad_x (either undefined when not needed),
// allocated with the strides of rows.x_hat.
void recon_backward_into(const at::Tensor& grad_loss, const ReconOperands& rows, int64_t reduction,
                         const at::Tensor& grad_x_hat, const at::Tensor& grad_x) {
  const BatchLayout layout = batch_layout(rows.x_hat);
  if (layout.numel == 0 || !(grad_x_hat.defined() || grad_x.defined())) return;
  const double scale = reduction_scale(reduction, layout);
  const RowChunking chunking(task_layout(layout, reduction == kNone));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.x_hat.scalar_type(), "gaussian_recon_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor grad_c = grad_loss.to(loss_dtype(rows.x_hat.scalar_type())).contiguous();
    const acc_t* g = grad_c.const_data_ptr<acc_t>();
    const scalar_t* xh = rows.x_hat.const_data_ptr<scalar_t>();
    const scalar_t* xv = rows.x.const_data_ptr<scalar_t>();
    scalar_t* gxh = grad_x_hat.defined() ? grad_x_hat.data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = grad_x.defined() ? grad_x.data_ptr<scalar_t>() : nullptr;
    chunking.for_each_task([&](int64_t task) {
      if (reduction == kNone && layout.per_sample < kLanes) {
        recon_backward_short_samples(xh, xv, chunking.begin(task), chunking.end(task), layout.per_sample, g,
                                     static_cast<acc_t>(scale), gxh, gx);
        return;
      }
      for (int64_t p = chunking.first_piece(task); p < chunking.end_piece(task); ++p) {
        const acc_t grad_rec = g[reduction == kNone ? chunking.row_of_piece(p) : 0] * static_cast<acc_t>(scale);
        recon_backward_range(xh, xv, chunking.piece_begin(p), chunking.piece_end(p), grad_rec, gxh, gx);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> gaussian_recon_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction,
    bool need_grad_x_hat, bool need_grad_x) {
  check_gaussian_recon_loss_backward(grad_loss, x_hat, x, reduction);
  const ReconOperands rows = recon_operands(x_hat, x);
  auto allocate_grad = [&](bool needed) {
    return needed ? empty_output(x_hat.sizes(), rows.x_hat.strides(), x_hat.options()) : at::empty({0}, x_hat.options());
  };
  at::Tensor grad_x_hat = allocate_grad(need_grad_x_hat), grad_x = allocate_grad(need_grad_x);
  recon_backward_into(grad_loss, rows, reduction, need_grad_x_hat ? grad_x_hat : at::Tensor(),
                      need_grad_x ? grad_x : at::Tensor());
  return {grad_x_hat, grad_x};
}

// grad_unit holds the gradient for an incoming gradient of 1; make it the one for grad_loss
// (csrc/fastelbo.h, scales_prepared_grad).
void gaussian_recon_loss_finish_grad_cpu(const at::Tensor& grad_unit, const at::Tensor& grad_loss,
                                         const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction) {
  check_gaussian_recon_loss_finish_grad(grad_unit, grad_loss, x_hat, x, reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_unit.scalar_type(), "gaussian_recon_loss_finish_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // (a CPU tensor: reading it costs no sync) g as the kernels use it, like the CUDA one
    const acc_t g = grad_loss.to(loss_dtype(grad_unit.scalar_type())).item<acc_t>();
    if (g == acc_t(1)) return;
    if constexpr (scales_prepared_grad(c10::CppTypeToScalarType<scalar_t>::value)) {
      scalar_t* data = grad_unit.data_ptr<scalar_t>();
      at::parallel_for(0, grad_unit.numel(), kMinElementsPerThread, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) data[i] = g * data[i];
      });
    } else {
      recon_backward_into(grad_loss, recon_operands(x_hat, x), reduction, grad_unit, at::Tensor());
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastelbo

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("gaussian_recon_loss", &fastelbo::cpu::gaussian_recon_loss_cpu);
  m.impl("gaussian_recon_loss_backward", &fastelbo::cpu::gaussian_recon_loss_backward_cpu);
  m.impl("gaussian_recon_loss_finish_grad_", &fastelbo::cpu::gaussian_recon_loss_finish_grad_cpu);
}
