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

// Each block of kBlock elements is summed in kLanes independent lanes held in one SIMD vector
// (GCC vector extension: the compiler emits packed instructions, and the lanes break the add
// dependency chain); the lanes are then combined in a fixed order and the block sums cascaded
// (CascadeSum) for torch.sum-like accuracy. Deterministic.
constexpr int kLanes = 8;
constexpr int64_t kBlock = kLanes * 16;

template <typename acc_t>
struct LaneVector;
template <>
struct LaneVector<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LaneVector<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};

template <bool kSaveGradUnit, typename scalar_t, typename acc_t>
acc_t recon_range_sum(const scalar_t* x_hat, const scalar_t* x, int64_t begin, int64_t end,
                      scalar_t* grad_unit, acc_t grad_scale) {
  using Lanes = typename LaneVector<acc_t>::type;
  const Lanes grad_scale_lanes = Lanes{} + grad_scale;
  CascadeSum<acc_t> total;
  for (int64_t i = begin; i < end;) {
    const int64_t block_end = std::min(end, i + kBlock);
    Lanes lanes = {};
    for (; i + kLanes <= block_end; i += kLanes) {
      Lanes xh, xv;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {  // whole-vector loads (no per-lane inserts)
        std::memcpy(&xh, x_hat + i, sizeof(Lanes));
        std::memcpy(&xv, x + i, sizeof(Lanes));
      } else {
        for (int l = 0; l < kLanes; ++l) {
          xh[l] = static_cast<acc_t>(x_hat[i + l]);
          xv[l] = static_cast<acc_t>(x[i + l]);
        }
      }
      lanes += math::recon_element(xh, xv);
      if constexpr (kSaveGradUnit) {
        const Lanes grad = math::grad_x_hat_element(xh, xv, grad_scale_lanes);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          std::memcpy(grad_unit + i, &grad, sizeof(Lanes));
        } else {
          for (int l = 0; l < kLanes; ++l) grad_unit[i + l] = static_cast<scalar_t>(grad[l]);
        }
      }
    }
    for (int l = 0; i < block_end; ++i, ++l) {
      const acc_t xh = static_cast<acc_t>(x_hat[i]), xv = static_cast<acc_t>(x[i]);
      lanes[l] += math::recon_element(xh, xv);
      if constexpr (kSaveGradUnit) {
        grad_unit[i] = static_cast<scalar_t>(math::grad_x_hat_element(xh, xv, grad_scale));
      }
    }
    acc_t block = 0;
    for (int l = 0; l < kLanes; ++l) block += lanes[l];
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
  const RowChunking chunking(layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_hat.scalar_type(), "gaussian_recon_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xh = x_hat_c.const_data_ptr<scalar_t>();
    const scalar_t* xv = x_c.const_data_ptr<scalar_t>();
    scalar_t* gu = save_grad_unit ? grad_unit.data_ptr<scalar_t>() : nullptr;
    // An empty batch has no tasks: the reduction writes its identity, 0.
    reduce_rows_into<acc_t>(chunking, layout, reduction, scale, loss, [&](int64_t task) {
      const int64_t begin = chunking.begin(task), end = chunking.end(task);
      const acc_t grad_scale = static_cast<acc_t>(scale);
      return gu ? recon_range_sum<true>(xh, xv, begin, end, gu, grad_scale)
                : recon_range_sum<false>(xh, xv, begin, end, gu, grad_scale);
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
  const RowChunking chunking(layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_hat.scalar_type(), "gaussian_recon_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor grad_c = grad_loss.to(loss_dtype(x_hat.scalar_type())).contiguous();
    const acc_t* g = grad_c.const_data_ptr<acc_t>();
    const scalar_t* xh = x_hat_c.const_data_ptr<scalar_t>();
    const scalar_t* xv = x_c.const_data_ptr<scalar_t>();
    scalar_t* gxh = need_grad_x_hat ? grad_x_hat.data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = need_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    chunking.for_each_task([&](int64_t task) {
      const acc_t grad_rec = g[reduction == kNone ? chunking.row(task) : 0] * static_cast<acc_t>(scale);
      for (int64_t i = chunking.begin(task), end = chunking.end(task); i < end; ++i) {
        const acc_t grad = math::grad_x_hat_element(static_cast<acc_t>(xh[i]), static_cast<acc_t>(xv[i]), grad_rec);
        if (gxh) gxh[i] = static_cast<scalar_t>(grad);
        if (gx) gx[i] = static_cast<scalar_t>(-grad);
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
