// Autograd for the two forward ops, as C++ torch::autograd::Functions registered at the Autograd
// dispatch key: calling torch.ops.fastelbo.reparameterize_kl / gaussian_recon_loss on tensors that
// require grad records one node each, whose backward calls the backward op through the dispatcher
// (which picks the CPU or CUDA kernel). In C++ rather than Python because at the sizes where a
// fused loss matters most for latency (an MNIST VAE step) the Python autograd.Function machinery
// (ctx objects, the engine calling back into Python for every backward) cost as much as the kernels.
//
// Under torch.compile the same code runs on fake tensors: AOTAutograd traces the forward op and,
// through these nodes, the backward op (both have fake implementations in fastelbo/ops.py).
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "fastelbo.h"
#include "op_handles.h"

namespace fastelbo {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether t is a tensor under tracing (fake, functional or symbolic-shape: torch.compile, opcheck),
// whose values are unknown.
bool is_traced(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize) ||
         t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// Whether t is a real CPU number equal to 1 (reading it then costs no device sync).
bool is_cpu_one(const at::Tensor& t) {
  return t.is_cpu() && !is_traced(t) && t.numel() == 1 && t.item<double>() == 1.0;
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// ---- double backward --------------------------------------------------------------------------

// Identity on one first-order gradient, whose own backward raises. The first-order gradients are
// exact; a graph built over them (create_graph=True) would treat them as constants and be
// silently wrong, so they are routed through this node instead. Its inputs also include the
// tensors the gradient depends on (the op's inputs and incoming gradients), so that the node sits
// on every path from the gradient back to them: both g.sum().backward() and
// torch.autograd.grad(g.sum(), mu) reach the error.
struct RefuseDoubleBackward : public torch::autograd::Function<RefuseDoubleBackward> {
  static at::Tensor forward(AutogradContext* ctx, const std::string& op_name, const at::Tensor& grad,
                            const std::optional<at::Tensor>& depends_on_0,
                            const std::optional<at::Tensor>& depends_on_1,
                            const std::optional<at::Tensor>& depends_on_2,
                            const std::optional<at::Tensor>& depends_on_3) {
    ctx->saved_data["op"] = op_name;
    return grad;
  }

  static variable_list backward(AutogradContext* ctx, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false, "fastelbo: double backward (differentiating the gradients of ",
                ctx->saved_data["op"].toStringRef(),
                ") is not supported; use fastelbo.reference for higher-order gradients");
    return {};
  }
};

// The gradients as they are in a plain backward; with create_graph=True (grad mode on inside the
// backward), each defined one through RefuseDoubleBackward.
void refuse_double_backward(const char* op_name, variable_list& grads,
                            const std::optional<at::Tensor>& depends_on_0,
                            const std::optional<at::Tensor>& depends_on_1,
                            const std::optional<at::Tensor>& depends_on_2,
                            const std::optional<at::Tensor>& depends_on_3) {
  if (!at::GradMode::is_enabled()) return;  // the usual case: backward without create_graph
  for (at::Tensor& grad : grads) {
    if (!grad.defined()) continue;
    grad = RefuseDoubleBackward::apply(std::string(op_name), grad, depends_on_0, depends_on_1,
                                       depends_on_2, depends_on_3);
  }
}

// ---- reparameterize_kl --------------------------------------------------------------------------

// z = mu + exp(logvar / 2) * eps and the reduced KL. The backward regenerates eps from the
// (seed, offset) the forward used (rng_state), so eps is never stored.
struct ReparameterizeKLFunction : public torch::autograd::Function<ReparameterizeKLFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const std::optional<at::Tensor>& eps,
                               const std::optional<at::Generator>& generator, int64_t num_samples,
                               int64_t reduction, double free_bits) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = typed_op<ReparamKLOp>("fastelbo::reparameterize_kl");
    // The kernels read contiguous memory. Non-contiguous inputs (typically mu and logvar as the
    // two halves of an encoder's moments, chunked along dim 1) are copied here, once, and the
    // copies kept for the backward, which would otherwise copy them again (on a GPU: two more
    // launches per step). The inputs themselves are kept too: refuse_double_backward needs mu and
    // logvar in the graph, and saving them (eps included) keeps autograd's check that none was
    // modified in place before the backward. For contiguous inputs the copies are the inputs.
    const at::Tensor mu_c = mu.contiguous(), logvar_c = logvar.contiguous();
    const std::optional<at::Tensor> eps_c =
        eps.has_value() ? std::optional<at::Tensor>(eps->contiguous()) : std::nullopt;
    auto [z, kl, rng_state, kl_position_mean] =
        op.call(mu_c, logvar_c, eps_c, generator, num_samples, reduction, free_bits);
    ctx->save_for_backward({mu, logvar, eps_c.value_or(at::Tensor()), rng_state, kl_position_mean, mu_c, logvar_c,
                            eps.value_or(at::Tensor())});
    ctx->saved_data["num_samples"] = num_samples;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["free_bits"] = free_bits;
    // rng_state and kl_position_mean are not differentiable, but are not marked so
    // (mark_non_differentiable): compiled autograd refuses a C++ Function that marks any output
    // (CppNode::compiled_args asserts the list is empty, torch 2.14). reparameterize_kl_autograd
    // hands them out detached instead.
    // An unused output (z or kl) gets an undefined gradient instead of zeros: no wasted pass.
    ctx->set_materialize_grads(false);
    return {z, kl, rng_state, kl_position_mean};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &mu = saved[0], &logvar = saved[1], &eps = saved[2];
    const std::optional<at::Tensor> grad_z = defined_or_none(grad_outputs[0]);
    const std::optional<at::Tensor> grad_kl = defined_or_none(grad_outputs[1]);
    variable_list grads(2);
    if (grad_z.has_value() || grad_kl.has_value()) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = typed_op<ReparamKLBackwardOp>("fastelbo::reparameterize_kl_backward");
      std::tie(grads[0], grads[1]) = op.call(
          grad_z, grad_kl, saved[5], saved[6], defined_or_none(eps), saved[3], saved[4],
          ctx->saved_data["num_samples"].toInt(), ctx->saved_data["reduction"].toInt(),
          ctx->saved_data["free_bits"].toDouble());
    }
    refuse_double_backward("reparameterize_kl", grads, mu, logvar, grad_z, grad_kl);
    // One entry per forward argument: mu, logvar, eps, generator, num_samples, reduction, free_bits.
    return {grads[0], grads[1], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

ReparamKLResult reparameterize_kl_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                           const std::optional<at::Tensor>& eps,
                                           std::optional<at::Generator> generator,
                                           int64_t num_samples, int64_t reduction,
                                           double free_bits) {
  // z = mu + std * eps depends on eps, but the backward gives eps no gradient (the kernels compute
  // none): an eps computed by something differentiable would silently lose that part of its
  // gradient. Refused instead, for every entry point that records a graph (fastelbo.ops.
  // ReparameterizeKL, whose forward runs with grad mode off, checks before it applies).
  TORCH_CHECK_VALUE(!(eps.has_value() && eps->requires_grad() && at::GradMode::is_enabled()),
                    kEpsRequiresGradMessage);
  variable_list out = ReparameterizeKLFunction::apply(mu, logvar, eps, generator, num_samples,
                                                      reduction, free_bits);
  // rng_state and kl_position_mean detached: not differentiable (see the forward).
  return {out[0], out[1], out[2].detach(), out[3].detach()};
}

// ---- gaussian_recon_loss ------------------------------------------------------------------------

// The reduced 1/2 ||x_hat - x||^2. save_grad_unit (fastelbo.gaussian_recon_loss decides): the
// forward also wrote scale * (x_hat - x), the gradient for an incoming gradient of exactly 1, and
// the backward of the usual loss.backward() hands it back with no pass over memory. On the CPU
// the backward sees that the incoming gradient is 1; on a GPU it cannot without a sync, so
// gaussian_recon_loss_finish_grad_ decides on the device, writing into the saved buffer, which
// it may do only when the graph is freed after this backward (no retain_graph: no later backward
// reads the buffer again). Not under tracing: a compiled graph would have to functionalize the
// write into a tensor that is also an output of the forward (AOTAutograd refuses that graph);
// the plain backward op gives the same values.
struct GaussianReconLossFunction : public torch::autograd::Function<GaussianReconLossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_hat, const at::Tensor& x,
                               int64_t reduction, bool save_grad_unit) {
    static const auto op = typed_op<GaussianReconLossOp>("fastelbo::gaussian_recon_loss");
    at::Tensor loss, grad_unit;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, grad_unit) = op.call(x_hat, x, reduction, save_grad_unit);
    }
    // Saved as a detached alias: a saved output comes back from the save with this node as its
    // grad_fn (grad_unit is not marked non-differentiable, below), and the backward hands the
    // buffer out as x_hat's gradient, which must not look differentiable to hooks and
    // torch.autograd.grad. Detached outside the guard above, so that the alias shares the
    // buffer's version counter: an in-place change to the returned buffer before the backward is
    // then refused by autograd's saved-tensor check, as for any saved tensor.
    ctx->save_for_backward({x_hat, x, save_grad_unit ? grad_unit.detach() : at::Tensor()});
    ctx->saved_data["reduction"] = reduction;
    // grad_unit is not differentiable; not marked so for compiled autograd (see
    // ReparameterizeKLFunction): gaussian_recon_loss_autograd hands it out detached.
    // No zero-filled stand-in gradient for grad_unit (an x_hat-sized output that is never
    // differentiated) nor for an unused loss.
    ctx->set_materialize_grads(false);
    return {loss, grad_unit};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x_hat = saved[0], &x = saved[1], &grad_unit = saved[2];
    const at::Tensor& grad_loss = grad_outputs[0];
    const bool need_x_hat = ctx->needs_input_grad(0), need_x = ctx->needs_input_grad(1);
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    variable_list grads(2);
    if (!grad_loss.defined()) {  // the loss was not used: no gradient
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // The saved buffer may be handed out (or written) only when the graph is freed after this
    // backward: under retain_graph a later backward would hand out or scale the same buffer in
    // place, changing a gradient the caller already holds.
    const bool buffer_is_ours = grad_unit.defined() && !torch::autograd::get_current_graph_task_keep_graph();
    if (grad_unit.defined() && is_cpu_one(grad_loss)) {
      grads[0] = buffer_is_ours ? grad_unit : grad_unit.clone();
      if (need_x) grads[1] = -grad_unit;
    } else if (buffer_is_ours && !need_x && reduction != kNone && !is_traced(grad_loss)) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = typed_op<GaussianReconLossFinishGradOp>("fastelbo::gaussian_recon_loss_finish_grad_");
      op.call(grad_unit, grad_loss, x_hat, x, reduction);
      grads[0] = grad_unit;
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = typed_op<GaussianReconLossBackwardOp>("fastelbo::gaussian_recon_loss_backward");
      std::tie(grads[0], grads[1]) = op.call(
          grad_loss, x_hat, x, reduction, need_x_hat, need_x);
    }
    if (!need_x_hat) grads[0] = at::Tensor();
    if (!need_x) grads[1] = at::Tensor();
    refuse_double_backward("gaussian_recon_loss", grads, x_hat, x, grad_loss, std::nullopt);
    // One entry per forward argument: x_hat, x, reduction, save_grad_unit.
    return {grads[0], grads[1], at::Tensor(), at::Tensor()};
  }
};

TensorPair gaussian_recon_loss_autograd(const at::Tensor& x_hat, const at::Tensor& x,
                                        int64_t reduction, bool save_grad_unit) {
  variable_list out = GaussianReconLossFunction::apply(x_hat, x, reduction, save_grad_unit);
  return {out[0], out[1].detach()};  // grad_unit: not differentiable (see the forward)
}

}  // namespace
}  // namespace fastelbo

// The Autograd alias key covers every backend's autograd key (AutogradCPU, AutogradCUDA, ...).
TORCH_LIBRARY_IMPL(fastelbo, Autograd, m) {
  m.impl("reparameterize_kl", &fastelbo::reparameterize_kl_autograd);
  m.impl("gaussian_recon_loss", &fastelbo::gaussian_recon_loss_autograd);
}
