// Typed dispatcher handles of fastelbo's ops, for the kernels that call an op back through the
// dispatcher below their own key (csrc/autograd.cpp at Autograd, csrc/autocast.cpp at Autocast).
// The signatures are the C++ forms of the schemas in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastelbo {

using ReparamKLResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;

using ReparamKLOp = ReparamKLResult(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                    std::optional<at::Generator>, int64_t, int64_t, double);
using ReparamKLBackwardOp = TensorPair(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                       const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                       const at::Tensor&, const at::Tensor&, int64_t, int64_t, double);
using GaussianReconLossOp = TensorPair(const at::Tensor&, const at::Tensor&, int64_t, bool);
using GaussianReconLossBackwardOp = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               bool, bool);
using GaussianReconLossFinishGradOp = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, int64_t);

// The typed dispatcher handle of op `name` ("fastelbo::..."); callers keep it in a static.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace fastelbo
