// Op schemas, the argument checks and output shapes every backend shares, and the Python
// module's init. The fake (shape-only) implementations that torch.compile and opcheck trace
// through are registered in Python (fastelbo/ops.py), where symbolic shapes are natural.
//
// Backends register their kernels for the same schemas in csrc/cpu/ and csrc/cuda/; the
// dispatcher, not Python, picks the one for the inputs' device.
#include <torch/extension.h>
#include <torch/library.h>
#include <c10/util/strides.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <sstream>
#include <utility>

#include "elbo_math.h"
#include "fastelbo.h"
#include "cpu/cpu_common.h"

namespace fastelbo {

std::string number_str(int64_t value) { return std::to_string(value); }

std::string number_str(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", value);
  return buffer;
}

std::string shape_str(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

namespace {

// On unless the environment variable `name` is "0" when first asked.
bool enabled_unless_zero(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::string(value) != "0";
}

std::atomic<bool>& cuda_clusters_flag() {
  static std::atomic<bool> flag{enabled_unless_zero("FASTELBO_CUDA_CLUSTERS")};
  return flag;
}

std::atomic<bool>& cuda_one_block_flag() {
  static std::atomic<bool> flag{enabled_unless_zero("FASTELBO_CUDA_ONE_BLOCK")};
  return flag;
}

std::atomic<bool>& cuda_large_blocks_flag() {
  static std::atomic<bool> flag{enabled_unless_zero("FASTELBO_CUDA_LARGE_BLOCKS")};
  return flag;
}

std::atomic<bool>& cuda_spread_flag() {
  static std::atomic<bool> flag{enabled_unless_zero("FASTELBO_CUDA_SPREAD")};
  return flag;
}

}  // namespace

bool cuda_clusters_enabled() { return cuda_clusters_flag().load(std::memory_order_relaxed); }

bool set_cuda_clusters_enabled(bool enabled) { return cuda_clusters_flag().exchange(enabled); }

bool cuda_one_block_enabled() { return cuda_one_block_flag().load(std::memory_order_relaxed); }

bool set_cuda_one_block_enabled(bool enabled) { return cuda_one_block_flag().exchange(enabled); }

bool cuda_large_blocks_enabled() { return cuda_large_blocks_flag().load(std::memory_order_relaxed); }

bool set_cuda_large_blocks_enabled(bool enabled) { return cuda_large_blocks_flag().exchange(enabled); }

bool cuda_spread_enabled() { return cuda_spread_flag().load(std::memory_order_relaxed); }

bool set_cuda_spread_enabled(bool enabled) { return cuda_spread_flag().exchange(enabled); }

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

const char* reduction_name(int64_t reduction) {
  switch (reduction) {
    case kNone: return "none";
    case kSum: return "sum";
    case kMean: return "mean";
    case kBatchMean: return "batchmean";
    default: return "?";
  }
}

void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kBatchMean, op,
                    ": unknown reduction code ", number_str(reduction),
                    " (expected 0=none, 1=sum, 2=mean, 3=batchmean)");
}

void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be a float32, float64, float16 or bfloat16 tensor, got ",
                   t.scalar_type());
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " and ", ref_name,
                   " must have the same dtype, got ", name, " ", t.scalar_type(), " and ",
                   ref_name, " ", ref.scalar_type());
}

// t's dtype against ref's under `rule` (fastelbo.h, DtypeRule); ref itself is checked on its own.
void check_dtype_by_rule(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                         const at::Tensor& ref, DtypeRule rule) {
  if (rule == DtypeRule::kSame) {
    check_same_dtype(op, name, t, ref_name, ref);
  } else {
    check_float_tensor(op, name, t);
  }
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " and ", ref_name,
              " must be on the same device, got ", name, " on ", t.device(), " and ", ref_name,
              " on ", ref.device());
}

void check_same_shape(const char* op, const char* name, at::IntArrayRef shape,
                      const char* ref_name, at::IntArrayRef ref_shape) {
  TORCH_CHECK_VALUE(shape == ref_shape, op, ": ", name, " and ", ref_name,
                    " must have the same shape, got ", name, " ", shape_str(shape), " and ", ref_name,
                    " ", shape_str(ref_shape));
}

std::vector<int64_t> sample_shape(const at::Tensor& mu, int64_t num_samples) {
  std::vector<int64_t> shape;
  if (num_samples > 1) shape.push_back(num_samples);
  for (auto s : mu.sizes()) shape.push_back(s);
  return shape;
}

}  // namespace

BatchLayout batch_layout(const at::Tensor& t) {
  BatchLayout layout;
  layout.batch = t.size(0);
  layout.numel = t.numel();
  int64_t per_sample = 1;
  for (int64_t d = 1; d < t.dim(); ++d) per_sample *= t.size(d);
  layout.per_sample = per_sample;
  return layout;
}

at::ScalarType loss_dtype(at::ScalarType input_dtype) {
  return (input_dtype == at::kHalf || input_dtype == at::kBFloat16) ? at::kFloat : input_dtype;
}

double reduction_scale(int64_t reduction, const BatchLayout& layout) {
  switch (reduction) {
    case kMean: return layout.numel > 0 ? 1.0 / static_cast<double>(layout.numel) : 0.0;
    case kBatchMean: return layout.batch > 0 ? 1.0 / static_cast<double>(layout.batch) : 0.0;
    default: return 1.0;
  }
}

// ---- reparameterize_kl ----------------------------------------------------------------------

void check_reparameterize_kl(const at::Tensor& mu, const at::Tensor& logvar,
                             const std::optional<at::Tensor>& eps, int64_t num_samples,
                             int64_t reduction, double free_bits, DtypeRule dtypes) {
  constexpr const char* op = "reparameterize_kl";
  check_float_tensor(op, "mu", mu);
  check_dtype_by_rule(op, "logvar", logvar, "mu", mu, dtypes);
  TORCH_CHECK_VALUE(mu.dim() >= 1, op,
                    ": mu must have a batch dimension (dim 0), got a 0-dim tensor");
  check_same_shape(op, "logvar", logvar.sizes(), "mu", mu.sizes());
  check_same_device(op, "logvar", logvar, "mu", mu);
  check_reduction(op, reduction);
  TORCH_CHECK_VALUE(num_samples >= 1, op, ": num_samples must be >= 1, got ", number_str(num_samples));
  TORCH_CHECK_VALUE(free_bits >= 0.0 && std::isfinite(free_bits), op,
                    ": free_bits must be a finite number >= 0, got ", number_str(free_bits));
  TORCH_CHECK_VALUE(!(free_bits > 0.0 && reduction == kNone), op,
                    ": free_bits > 0 is defined for reduction 'sum', 'mean' and 'batchmean', not "
                    "'none' (the floor applies to the batch-mean KL of each latent position)");
  if (eps.has_value()) {
    const at::Tensor& e = *eps;
    check_dtype_by_rule(op, "eps", e, "mu", mu, dtypes);
    check_same_device(op, "eps", e, "mu", mu);
    const auto z_shape = sample_shape(mu, num_samples);
    TORCH_CHECK_VALUE(e.sizes() == at::IntArrayRef(z_shape), op,
                      ": eps must have the shape of z, ", shape_str(z_shape),
                      " (num_samples=", number_str(num_samples), ", mu ", shape_str(mu.sizes()),
                      "), got eps ", shape_str(e.sizes()));
  }
}

ReparamKLOutputs allocate_reparameterize_kl(const at::Tensor& mu, int64_t num_samples,
                                            int64_t reduction, double free_bits,
                                            EmptyFn empty_large) {
  const BatchLayout layout = batch_layout(mu);
  const auto acc_options = mu.options().dtype(loss_dtype(mu.scalar_type()));
  ReparamKLOutputs out;
  const auto z_shape = sample_shape(mu, num_samples);
  out.z = empty_large ? empty_large(z_shape, mu.options()) : at::empty(z_shape, mu.options());
  out.kl = reduction == kNone ? at::empty({layout.batch}, acc_options) : at::empty({}, acc_options);
  out.rng_state = at::empty({2}, mu.options().dtype(at::kLong));
  out.kl_position_mean =
      at::empty({free_bits > 0.0 ? layout.per_sample : 0}, acc_options);
  return out;
}

void check_reparameterize_kl_backward(const std::optional<at::Tensor>& grad_z,
                                      const std::optional<at::Tensor>& grad_kl,
                                      const at::Tensor& mu, const at::Tensor& logvar,
                                      const std::optional<at::Tensor>& eps,
                                      const at::Tensor& rng_state,
                                      const at::Tensor& kl_position_mean, int64_t num_samples,
                                      int64_t reduction, double free_bits) {
  constexpr const char* op = "reparameterize_kl_backward";
  check_reparameterize_kl(mu, logvar, eps, num_samples, reduction, free_bits);
  const BatchLayout layout = batch_layout(mu);
  if (grad_z.has_value()) {
    check_same_dtype(op, "grad_z", *grad_z, "mu", mu);
    check_same_device(op, "grad_z", *grad_z, "mu", mu);
    const auto z_shape = sample_shape(mu, num_samples);
    check_same_shape(op, "grad_z", grad_z->sizes(), "z", z_shape);
  }
  if (grad_kl.has_value()) {
    check_same_device(op, "grad_kl", *grad_kl, "mu", mu);
    check_float_tensor(op, "grad_kl", *grad_kl);
    if (reduction == kNone) {
      check_same_shape(op, "grad_kl", grad_kl->sizes(), "kl", {layout.batch});
    } else {
      TORCH_CHECK_VALUE(grad_kl->numel() == 1, op,
                        ": grad_kl of a reduced KL must have one element, got shape ",
                        shape_str(grad_kl->sizes()));
    }
  }
  TORCH_CHECK_TYPE(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2, op,
                   ": rng_state must be the (2,) int64 tensor returned by reparameterize_kl");
  check_same_device(op, "rng_state", rng_state, "mu", mu);
  if (free_bits > 0.0) {
    TORCH_CHECK_VALUE(kl_position_mean.numel() == layout.per_sample, op,
                      ": kl_position_mean must have ", number_str(layout.per_sample),
                      " elements (one per latent position), got ", number_str(kl_position_mean.numel()));
    check_same_device(op, "kl_position_mean", kl_position_mean, "mu", mu);
  }
}

// ---- gaussian_recon_loss --------------------------------------------------------------------

void check_gaussian_recon_loss(const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction,
                               DtypeRule dtypes) {
  constexpr const char* op = "gaussian_recon_loss";
  check_float_tensor(op, "x_hat", x_hat);
  check_dtype_by_rule(op, "x", x, "x_hat", x_hat, dtypes);
  TORCH_CHECK_VALUE(x_hat.dim() >= 1, op,
                    ": x_hat must have a batch dimension (dim 0), got a 0-dim tensor");
  check_same_shape(op, "x", x.sizes(), "x_hat", x_hat.sizes());
  check_same_device(op, "x", x, "x_hat", x_hat);
  check_reduction(op, reduction);
}

at::Tensor allocate_recon_loss(const at::Tensor& x_hat, int64_t reduction) {
  const auto options = x_hat.options().dtype(loss_dtype(x_hat.scalar_type()));
  return reduction == kNone ? at::empty({x_hat.size(0)}, options) : at::empty({}, options);
}

namespace {

// Whether t's elements fill [data, data + numel) without gaps or overlaps (c10's
// non-overlapping-and-dense test, which ignores the strides of size-1 dims), each sample a run of
// D consecutive elements (the batch dim outermost). fastelbo/ops.py (_recon_grad_strides)
// mirrors this test for the fake tensors, where the sizes may be symbolic.
bool rows_in_memory_order(const at::Tensor& t) {
  if (t.is_contiguous()) return true;  // also every empty tensor
  return t.is_non_overlapping_and_dense() && (t.size(0) == 1 || t.stride(0) * t.size(0) == t.numel());
}

// Same strides in every dim of size > 1 (equal sizes checked by the caller).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

}  // namespace

ReconOperands recon_operands(const at::Tensor& x_hat, const at::Tensor& x) {
  if (rows_in_memory_order(x_hat)) {
    if (same_layout(x_hat, x)) return {x_hat, x};
    // x in another layout (e.g. contiguous data against a channels_last decoder output): one
    // copy of x into x_hat's layout, rather than copies of both and gradients that autograd
    // would copy into x_hat's layout once more.
    at::Tensor x_like = at::empty_strided(x_hat.sizes(), x_hat.strides(), x.options());
    x_like.copy_(x);
    return {x_hat, std::move(x_like)};
  }
  return {x_hat.contiguous(), x.contiguous()};
}

void check_gaussian_recon_loss_backward(const at::Tensor& grad_loss, const at::Tensor& x_hat,
                                        const at::Tensor& x, int64_t reduction) {
  constexpr const char* op = "gaussian_recon_loss_backward";
  check_gaussian_recon_loss(x_hat, x, reduction);
  check_float_tensor(op, "grad_loss", grad_loss);
  check_same_device(op, "grad_loss", grad_loss, "x_hat", x_hat);
  if (reduction == kNone) {
    check_same_shape(op, "grad_loss", grad_loss.sizes(), "loss", {x_hat.size(0)});
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op,
                      ": grad_loss of a reduced loss must have one element, got shape ",
                      shape_str(grad_loss.sizes()), " (reduction '", reduction_name(reduction), "')");
  }
}

c10::DimVector recon_grad_strides(const at::Tensor& x_hat) {
  if (rows_in_memory_order(x_hat)) return c10::DimVector(x_hat.strides());
  return c10::contiguous_strides(x_hat.sizes());  // what x_hat.contiguous() has
}

void check_gaussian_recon_loss_finish_grad(const at::Tensor& grad_unit, const at::Tensor& grad_loss,
                                            const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction) {
  constexpr const char* op = "gaussian_recon_loss_finish_grad_";
  check_gaussian_recon_loss_backward(grad_loss, x_hat, x, reduction);
  TORCH_CHECK_VALUE(reduction != kNone, op, ": reduction 'none' is not supported (the forward prepares ",
                    "no gradient for it)");
  check_same_dtype(op, "grad_unit", grad_unit, "x_hat", x_hat);
  check_same_device(op, "grad_unit", grad_unit, "x_hat", x_hat);
  check_same_shape(op, "grad_unit", grad_unit.sizes(), "x_hat", x_hat.sizes());
  // The kernels take it as B rows of D elements in the order they read x_hat: the layout the
  // forward gave it.
  const c10::DimVector strides = recon_grad_strides(x_hat);
  TORCH_CHECK_VALUE(grad_unit.numel() == 0 || (grad_unit.is_non_overlapping_and_dense() &&
                                               grad_unit.strides() == at::IntArrayRef(strides)),
                    op, ": grad_unit must have the layout of the gradient the forward wrote (strides ",
                    shape_str(strides), "), got strides ", shape_str(grad_unit.strides()));
}

}  // namespace fastelbo

// The schemas. The sampling op takes the generator itself and is tagged nondeterministic_seeded,
// so the compiler never merges or reorders two draws and a captured CUDA graph draws anew on every
// replay; it returns the (seed, offset) it used as rng_state, which the backward takes as an
// ordinary input to regenerate the same eps (DESIGN.md section 5).
TORCH_LIBRARY(fastelbo, m) {
  m.def(
      "reparameterize_kl(Tensor mu, Tensor logvar, Tensor? eps, Generator? generator, "
      "int num_samples, int reduction, float free_bits) "
      "-> (Tensor z, Tensor kl, Tensor rng_state, Tensor kl_position_mean)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "reparameterize_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, "
      "Tensor? eps, Tensor rng_state, Tensor kl_position_mean, int num_samples, int reduction, "
      "float free_bits) -> (Tensor grad_mu, Tensor grad_logvar)");
  m.def(
      "gaussian_recon_loss(Tensor x_hat, Tensor x, int reduction, bool save_grad_unit) "
      "-> (Tensor loss, Tensor grad_unit)");
  m.def(
      "gaussian_recon_loss_backward(Tensor grad_loss, Tensor x_hat, Tensor x, int reduction, "
      "bool need_grad_x_hat, bool need_grad_x) -> (Tensor grad_x_hat, Tensor grad_x)");
  // The backward when the forward wrote grad_unit (the x_hat gradient for an incoming gradient of
  // exactly 1; save_grad_unit): turns it into the x_hat gradient for grad_loss, in place. It is
  // left as it is when grad_loss is 1 (the usual loss.backward()): on a GPU the kernel reads
  // grad_loss and returns at once, so that backward costs no pass over memory and no host sync.
  // Otherwise float32/float64 buffers are multiplied by grad_loss and 16-bit ones overwritten
  // with what gaussian_recon_loss_backward gives (csrc/fastelbo.h, scales_prepared_grad).
  m.def(
      "gaussian_recon_loss_finish_grad_(Tensor(a!) grad_unit, Tensor grad_loss, Tensor x_hat, Tensor x, "
      "int reduction) -> ()");
}

// c10's CPU allocator flag: when set, new CPU allocations are filled with a junk pattern (NaN for
// float32) instead of whatever memory held before. Tests set it to prove every output element is
// written. Declared here because c10 exports the flag but no header declares it.
extern bool FLAGS_caffe2_cpu_allocator_do_junk_fill;

#ifdef FASTELBO_WITH_CUDA
// The launch-shape queries below take B samples of D positions and num_samples draws.
static void check_shape_counts(const char* query, int64_t batch, int64_t per_sample, int64_t num_samples) {
  TORCH_CHECK_VALUE(batch >= 1 && per_sample >= 1 && num_samples >= 1, query,
                    " takes B >= 1, D >= 1 and num_samples >= 1");
}
#endif

// Small helpers for tests and diagnostics; the ops themselves go through the dispatcher.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastelbo's compiled ops (registered under torch.ops.fastelbo) and diagnostics";
  m.attr("_eps_requires_grad_message") = fastelbo::kEpsRequiresGradMessage;  // (fastelbo.ops raises it too)
  m.def(
      "philox4x32_10",
      [](std::vector<uint32_t> counter, std::vector<uint32_t> key) {
        TORCH_CHECK_VALUE(counter.size() == 4 && key.size() == 2,
                          "philox4x32_10 takes 4 counter words and 2 key words");
        const auto out = fastelbo::math::philox4x32_10(
            fastelbo::math::Philox4{{counter[0], counter[1], counter[2], counter[3]}}, key[0],
            key[1]);
        return std::vector<uint32_t>{out.v[0], out.v[1], out.v[2], out.v[3]};
      },
      "Philox4x32-10 of one counter block (for known-answer tests).");
  m.def(
      "_set_cpu_allocator_junk_fill",
      [](bool enabled) {
        const bool previous = FLAGS_caffe2_cpu_allocator_do_junk_fill;
        FLAGS_caffe2_cpu_allocator_do_junk_fill = enabled;
        return previous;
      },
      "Fill new CPU allocations with a NaN junk pattern (tests: poisoned outputs). Returns the "
      "previous setting.");
  m.def("_cpu_cache_bytes", &fastelbo::cpu::cached_output_bytes,
        "Bytes of CPU output buffers held for reuse (not in use by any tensor).");
  m.def("_empty_cpu_cache", &fastelbo::cpu::empty_output_cache,
        "Return the cached CPU output buffers to the system.");
  m.def("_cpu_vector_paths_enabled", &fastelbo::cpu::cpu_vector_paths_enabled,
        "Whether the CPU kernels may use their x86-64 vector paths (AVX2, F16C) where the processor "
        "has them (see _set_cpu_vector_paths).");
  m.def("_set_cpu_vector_paths", &fastelbo::cpu::set_cpu_vector_paths_enabled,
        "Whether the CPU kernels may use their x86-64 vector paths (True, the default) or run the "
        "portable scalar code that other processors run (False; for tests: values may differ in the "
        "last bit). Returns the previous setting.");
  // The CUDA A/B switches (csrc/fastelbo.h): _<name>_enabled() and _set_<name>(on), which returns
  // the previous setting. `what`: what the switch, on, does; `off`: what runs instead.
  const auto def_cuda_switch = [&m](const std::string& name, bool (*enabled)(), bool (*set)(bool),
                                    const std::string& variable, const std::string& what,
                                    const std::string& off) {
    m.def(("_" + name + "_enabled").c_str(), enabled, ("Whether " + what + " (see _set_" + name + ").").c_str());
    m.def(("_set_" + name).c_str(), set,
          ("Whether " + what + " (True, the default unless " + variable + "=0) or " + off +
           ". Returns the previous setting.")
              .c_str());
  };
  def_cuda_switch("cuda_clusters", &fastelbo::cuda_clusters_enabled, &fastelbo::set_cuda_clusters_enabled,
                  "FASTELBO_CUDA_CLUSTERS", "small CUDA grids reduce inside a Hopper thread-block cluster",
                  "through the global ticket (False; same results)");
  def_cuda_switch("cuda_one_block", &fastelbo::cuda_one_block_enabled, &fastelbo::set_cuda_one_block_enabled,
                  "FASTELBO_CUDA_ONE_BLOCK", "the smallest flat CUDA reductions run as one block",
                  "as the small grid of several blocks (False; another summation order, so losses may differ "
                  "in the last bits: for timing one shape against the other)");
  def_cuda_switch("cuda_large_blocks", &fastelbo::cuda_large_blocks_enabled,
                  &fastelbo::set_cuda_large_blocks_enabled, "FASTELBO_CUDA_LARGE_BLOCKS",
                  "the memory-bound CUDA grids past the small sizes run in blocks of up to 512 threads",
                  "in blocks of 128 (False; another summation order for the forward reductions, so losses "
                  "may differ in the last bits: for timing one shape against the other)");
  def_cuda_switch("cuda_spread", &fastelbo::cuda_spread_enabled,
                  &fastelbo::set_cuda_spread_enabled, "FASTELBO_CUDA_SPREAD",
                  "CUDA problems that give few threads work are spread over more (free bits over a tall "
                  "batch, reduction 'none' on short samples, num_samples > 1 on a small latent, also with 'none' "
                  "or free bits)",
                  "run in the kernels' plain shapes (False; another summation order for free bits' sums and "
                  "the many-draw loss and gradients, so these may differ in the last bits: for timing one "
                  "shape against the other)");
#ifdef FASTELBO_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def(
      "_cuda_cluster_capacity",
      [](int device) {
        return std::map<std::string, int64_t>{
            {"gaussian_recon_loss", fastelbo::cuda::recon_forward_cluster_capacity(device)},
            {"reparameterize_kl", fastelbo::cuda::reparam_kl_forward_cluster_capacity(device)}};
      },
      "The largest thread-block cluster (blocks; 0: none) each op's float32 forward reduction can "
      "use on a CUDA device.");
  m.def(
      "_cuda_free_bits_grid",
      [](int64_t batch, int64_t per_sample, int64_t num_samples) {
        check_shape_counts("_cuda_free_bits_grid", batch, per_sample, num_samples);
        const fastelbo::cuda::FreeBitsGrid grid = fastelbo::cuda::free_bits_grid(batch, per_sample, num_samples);
        return std::map<std::string, int64_t>{{"col_windows", grid.col_windows},
                                              {"col_tiles", grid.col_tiles},
                                              {"row_splits", grid.row_splits},
                                              {"blocks", grid.blocks},
                                              {"draw_lanes", int64_t{1} << grid.draw_shift}};
      },
      "The launch shape of the CUDA free-bits forward for B samples of D positions and num_samples "
      "draws (draw_lanes: lanes sharing each sample's draws; no GPU needed).",
      pybind11::arg("batch"), pybind11::arg("per_sample"), pybind11::arg("num_samples") = 1);
  m.def(
      "_cuda_draw_lanes",
      [](int64_t numel, int64_t num_samples) {
        TORCH_CHECK_VALUE(numel >= 1 && num_samples >= 1, "_cuda_draw_lanes takes numel >= 1 and num_samples >= 1");
        return int64_t{1} << fastelbo::cuda::draw_lanes_shift(numel, num_samples);
      },
      "Lanes per 4-element chunk of the CUDA sample+KL kernels for num_samples draws of numel latent "
      "elements (1: one thread draws them all; no GPU needed).");
  m.def(
      "_cuda_short_rows_lanes",
      [](int64_t batch, int64_t per_sample, int64_t num_samples) {
        check_shape_counts("_cuda_short_rows_lanes", batch, per_sample, num_samples);
        const fastelbo::cuda::ShortRowsLanes lanes = fastelbo::cuda::short_rows_lanes(batch, per_sample, num_samples);
        return std::map<std::string, int64_t>{{"window_lanes", lanes.window_lanes},
                                              {"draw_lanes", int64_t{1} << lanes.draw_shift}};
      },
      "Lanes of the CUDA sample+KL forward for reduction \"none\" on B short samples of D positions: "
      "window_lanes per sample (0: the samples are too long, the rows kernel takes them) and draw_lanes "
      "per window sharing the num_samples draws (no GPU needed).");
#else
  m.attr("built_with_cuda") = false;
#endif
}
