// Autocast (torch.autocast) for the two forward ops: mixed floating dtypes are promoted to the
// widest of them, as torch's "promote" ops do under autocast, instead of raising the TypeError that
// mismatched dtypes get outside autocast.
//
// Why. Under autocast an encoder's and a decoder's outputs come back in bfloat16 or float16 while
// the data x stays float32, so gaussian_recon_loss(x_hat, x) would meet two dtypes in every mixed
// precision training step; torch's mse_loss accepts that (autocast runs it in float32).
// Why promote rather than cast everything to float32 as autocast does for mse_loss: the kernels
// already compute and accumulate in float32 and return float32 losses for 16-bit inputs, so
// inputs that agree on a 16-bit dtype are read as they are (half the bytes), and only a mixed pair
// pays for one cast, to the wider dtype, like torch.cat under autocast.
//
// Registered at the autocast keys, which the dispatcher visits before autograd: the casts below
// are recorded by autograd like any other op, so gradients come back in each input's own dtype.
// The backward ops need nothing here: they are called with the promoted tensors.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "fastelbo.h"
#include "op_handles.h"

namespace fastelbo {
namespace {

// The widest dtype among the given tensors (null pointers skipped), each of them one of the four
// computed dtypes by then (the kernels below check first).
at::ScalarType widest_dtype(const at::Tensor& first, std::initializer_list<const at::Tensor*> others) {
  at::ScalarType widest = first.scalar_type();
  for (const at::Tensor* t : others) {
    if (t != nullptr) widest = at::promote_types(widest, t->scalar_type());
  }
  return widest;
}

at::Tensor cast_to(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

ReparamKLResult reparameterize_kl_autocast(const at::Tensor& mu, const at::Tensor& logvar,
                                           const std::optional<at::Tensor>& eps,
                                           std::optional<at::Generator> generator, int64_t num_samples,
                                           int64_t reduction, double free_bits) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static const auto op = typed_op<ReparamKLOp>("fastelbo::reparameterize_kl");
  // The op's own checks but for the dtypes' agreement, before any cast (see DtypeRule).
  check_reparameterize_kl(mu, logvar, eps, num_samples, reduction, free_bits, DtypeRule::kEachSupported);
  const at::ScalarType dtype = widest_dtype(mu, {&logvar, eps ? &*eps : nullptr});
  const std::optional<at::Tensor> eps_cast = eps ? std::optional<at::Tensor>(cast_to(*eps, dtype)) : std::nullopt;
  return op.call(cast_to(mu, dtype), cast_to(logvar, dtype), eps_cast, std::move(generator), num_samples,
                 reduction, free_bits);
}

TensorPair gaussian_recon_loss_autocast(const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction,
                                        bool save_grad_unit) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static const auto op = typed_op<GaussianReconLossOp>("fastelbo::gaussian_recon_loss");
  check_gaussian_recon_loss(x_hat, x, reduction, DtypeRule::kEachSupported);  // (as above)
  const at::ScalarType dtype = widest_dtype(x_hat, {&x});
  return op.call(cast_to(x_hat, dtype), cast_to(x, dtype), reduction, save_grad_unit);
}

}  // namespace
}  // namespace fastelbo

TORCH_LIBRARY_IMPL(fastelbo, AutocastCPU, m) {
  m.impl("reparameterize_kl", &fastelbo::reparameterize_kl_autocast);
  m.impl("gaussian_recon_loss", &fastelbo::gaussian_recon_loss_autocast);
}

TORCH_LIBRARY_IMPL(fastelbo, AutocastCUDA, m) {
  m.impl("reparameterize_kl", &fastelbo::reparameterize_kl_autocast);
  m.impl("gaussian_recon_loss", &fastelbo::gaussian_recon_loss_autocast);
}
