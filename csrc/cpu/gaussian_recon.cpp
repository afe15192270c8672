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

  // The kPerVector elements at p, converted to acc_t.
  template <typename scalar_t>
  static Vector load(const scalar_t* p) {
    Vector v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(&v, p, sizeof(Vector));  // one unaligned vector load
    } else {
      for (int e = 0; e < kPerVector; ++e) v[e] = static_cast<acc_t>(p[e]);
    }
    return v;
  }

  template <typename scalar_t>
  static void store(const Vector& v, scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(p, &v, sizeof(Vector));
    } else {
      for (int e = 0; e < kPerVector; ++e) p[e] = static_cast<scalar_t>(v[e]);
    }
  }
};

template <bool kSaveGradUnit, typename scalar_t, typename acc_t>
acc_t recon_range_sum(const scalar_t* x_hat, const scalar_t* x, int64_t begin, int64_t end,
                      scalar_t* grad_unit, acc_t grad_scale) {
  using LV = LaneVectors<acc_t>;
  using Vector = typename LV::Vector;
  constexpr int kPerVector = LV::kPerVector, kVectors = LV::kVectors;
  const Vector grad_scale_vector = Vector{} + grad_scale;
  CascadeSum<acc_t> total;
  for (int64_t i = begin; i < end;) {
    const int64_t block_end = std::min(end, i + kBlock);
    Vector lanes[kVectors] = {};
    for (; i + kLanes <= block_end; i += kLanes) {
#pragma GCC unroll 4
      for (int k = 0; k < kVectors; ++k) {
        const int64_t at = i + k * kPerVector;
        const Vector xh = LV::load(x_hat + at), xv = LV::load(x + at);
        lanes[k] += math::recon_element(xh, xv);
        if constexpr (kSaveGradUnit) LV::store(math::grad_x_hat_element(xh, xv, grad_scale_vector), grad_unit + at);
      }
    }
    if (i < block_end) {  // the last (< kLanes) elements: lane l takes element i + l
      // Zero-padded copies: a padded lane adds recon_element(0, 0) = +0, which leaves it as is.
      acc_t tail_xh[kLanes] = {}, tail_xv[kLanes] = {};
      for (int l = 0; i + l < block_end; ++l) {
        tail_xh[l] = static_cast<acc_t>(x_hat[i + l]);
        tail_xv[l] = static_cast<acc_t>(x[i + l]);
      }
#pragma GCC unroll 4
      for (int k = 0; k < kVectors; ++k) {
        lanes[k] += math::recon_element(LV::load(tail_xh + k * kPerVector), LV::load(tail_xv + k * kPerVector));
      }
      if constexpr (kSaveGradUnit) {
        for (int l = 0; i < block_end; ++i, ++l) {
          grad_unit[i] = static_cast<scalar_t>(math::grad_x_hat_element(tail_xh[l], tail_xv[l], grad_scale));
        }
      }
      i = block_end;
    }
    acc_t block = 0;
    for (int k = 0; k < kVectors; ++k) {
      for (int e = 0; e < kPerVector; ++e) block += lanes[k][e];  // lanes 0, 1, ..., kLanes - 1
    }
    total.add(block);
  }
  return total.sum();
}

std::tuple<at::Tensor, at::Tensor> gaussian_recon_loss_cpu(const at::Tensor& x_hat,
                                                           const at::Tensor& x, int64_t reduction,
                                                           bool save_grad_unit) {
  check_gaussian_recon_loss(x_hat, x, reduction);
  at::Tensor loss = allocate_recon_loss(x_hat, reduction);
  at::Tensor grad_unit = save_grad_unit ? empty_output(x_hat.sizes(), x_hat.options())
                                        : at::empty({0}, x_hat.options());
  const BatchLayout layout = batch_layout(x_hat);
  const double scale = reduction_scale(reduction, layout);
  const at::Tensor x_hat_c = x_hat.contiguous(), x_c = x.contiguous();
  const BatchLayout work = task_layout(layout, reduction == kNone);
  const RowChunking chunking(work);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_hat.scalar_type(), "gaussian_recon_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xh = x_hat_c.const_data_ptr<scalar_t>();
    const scalar_t* xv = x_c.const_data_ptr<scalar_t>();
    scalar_t* gu = save_grad_unit ? grad_unit.data_ptr<scalar_t>() : nullptr;
    // An empty batch has no tasks: the reduction writes its identity, 0.
    const acc_t grad_scale = static_cast<acc_t>(scale);
    reduce_rows_into<acc_t>(chunking, work, reduction, scale, loss, [&](int64_t task, acc_t* sums) {
      for (int64_t p = chunking.first_piece(task); p < chunking.end_piece(task); ++p) {
        const int64_t begin = chunking.piece_begin(p), end = chunking.piece_end(p);
        *sums++ = gu ? recon_range_sum<true>(xh, xv, begin, end, gu, grad_scale)
                     : recon_range_sum<false>(xh, xv, begin, end, gu, grad_scale);
      }
    });
  });
  return {loss, grad_unit};
}

std::tuple<at::Tensor, at::Tensor> gaussian_recon_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction,
    bool need_grad_x_hat, bool need_grad_x) {
  check_gaussian_recon_loss_backward(grad_loss, x_hat, x, reduction);
  auto allocate_grad = [&](bool needed) {
    return needed ? empty_output(x_hat.sizes(), x_hat.options()) : at::empty({0}, x_hat.options());
  };
  at::Tensor grad_x_hat = allocate_grad(need_grad_x_hat), grad_x = allocate_grad(need_grad_x);
  const BatchLayout layout = batch_layout(x_hat);
  if (layout.numel == 0 || !(need_grad_x_hat || need_grad_x)) return {grad_x_hat, grad_x};

  const double scale = reduction_scale(reduction, layout);
  const at::Tensor x_hat_c = x_hat.contiguous(), x_c = x.contiguous();
  const RowChunking chunking(task_layout(layout, reduction == kNone));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_hat.scalar_type(), "gaussian_recon_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor grad_c = grad_loss.to(loss_dtype(x_hat.scalar_type())).contiguous();
    const acc_t* g = grad_c.const_data_ptr<acc_t>();
    const scalar_t* xh = x_hat_c.const_data_ptr<scalar_t>();
    const scalar_t* xv = x_c.const_data_ptr<scalar_t>();
    scalar_t* gxh = need_grad_x_hat ? grad_x_hat.data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = need_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    chunking.for_each_task([&](int64_t task) {
      for (int64_t p = chunking.first_piece(task); p < chunking.end_piece(task); ++p) {
        const acc_t grad_rec = g[reduction == kNone ? chunking.row_of_piece(p) : 0] * static_cast<acc_t>(scale);
        for (int64_t i = chunking.piece_begin(p), end = chunking.piece_end(p); i < end; ++i) {
          const acc_t grad = math::grad_x_hat_element(static_cast<acc_t>(xh[i]), static_cast<acc_t>(xv[i]), grad_rec);
          if (gxh) gxh[i] = static_cast<scalar_t>(grad);
          if (gx) gx[i] = static_cast<scalar_t>(-grad);
        }
      }
    });
  });
  return {grad_x_hat, grad_x};
}

}  // namespace
}  // namespace cpu
}  // namespace fastelbo

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("gaussian_recon_loss", &fastelbo::cpu::gaussian_recon_loss_cpu);
  m.impl("gaussian_recon_loss_backward", &fastelbo::cpu::gaussian_recon_loss_backward_cpu);
}
