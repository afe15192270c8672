// Host-side contract shared by the CPU and CUDA backends: argument checks, output shapes
// and dtypes, and the reduction scale. Validating and allocating in one place keeps the backends
// from drifting apart and makes every bad input fail before any kernel runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "elbo_math.h"

namespace fastelbo {

// Size of a latent tensor viewed as (batch, per_sample): dim 0 is the batch, every other dim is
// summed within a sample.
struct BatchLayout {
  int64_t batch = 0;       // B
  int64_t per_sample = 0;  // D (product of the non-batch dims)
  int64_t numel = 0;       // N = B * D
};
BatchLayout batch_layout(const at::Tensor& t);

// Losses come back in float32 for half/bfloat16 inputs (as autocast does for mse_loss) and in the
// input dtype otherwise.
at::ScalarType loss_dtype(at::ScalarType input_dtype);

// The factor that turns the sum over all elements into the requested reduction:
// sum -> 1, mean -> 1 / numel, batchmean -> 1 / batch, none -> 1 (per-sample sums).
double reduction_scale(int64_t reduction, const BatchLayout& layout);

// Numbers and shapes for error and warning messages, formatted with std::to_string / snprintf
// rather than streamed: on one CUDA image (nvidia-h200 device machines, torch 2.11, extension
// built by its /opt/gcc), streaming an integer or a double into a TORCH_CHECK message from this
// extension crashed the process, while strings streamed fine (benches/RESULTS.md, GPU section).
std::string number_str(int64_t value);
std::string number_str(double value);
std::string shape_str(at::IntArrayRef shape);

// How the argument checks treat the floating tensors' dtypes. kSame: each must have the first
// one's dtype (the ops: mixed dtypes are a TypeError). kEachSupported: each must be one of the four
// computed dtypes, but they may differ: the autocast kernels check that way before they promote, so
// that a shape or device error (or a float8 tensor, which torch cannot promote) is the op's own
// error, raised before a cast kernel runs.
enum class DtypeRule { kSame, kEachSupported };

// ---- reparameterize_kl ----------------------------------------------------------------------
// An eps that requires grad while grad mode is on: the backward gives eps no gradient, so the op's
// autograd kernel (csrc/autograd.cpp) refuses it with this ValueError, and fastelbo.ops'
// Function, which runs the op with grad mode off, raises the same text (fastelbo._C).
inline constexpr const char* kEpsRequiresGradMessage =
    "reparameterize_kl: eps must not require grad (fastelbo does not differentiate with respect to eps)";

void check_reparameterize_kl(const at::Tensor& mu, const at::Tensor& logvar,
                             const std::optional<at::Tensor>& eps, int64_t num_samples,
                             int64_t reduction, double free_bits, DtypeRule dtypes = DtypeRule::kSame);

struct ReparamKLOutputs {
  at::Tensor z;                 // (K, *mu.shape) for K > 1, else mu.shape; mu's dtype
  at::Tensor kl;                // (B,) for "none", else a scalar; loss_dtype
  at::Tensor rng_state;         // (2,) int64 = (seed, offset) on mu's device; zeros when eps is given
  at::Tensor kl_position_mean;  // (D,) batch-mean KL per position when free_bits > 0, else (0,)
};
// Allocates the outputs on mu's device with the documented shapes and dtypes (the fake
// implementations in fastelbo/ops.py mirror these shapes for torch.compile).
// empty_large allocates z (the one large output); at::empty when not given.
using EmptyFn = at::Tensor (*)(at::IntArrayRef, const at::TensorOptions&);
ReparamKLOutputs allocate_reparameterize_kl(const at::Tensor& mu, int64_t num_samples,
                                            int64_t reduction, double free_bits,
                                            EmptyFn empty_large = nullptr);

void check_reparameterize_kl_backward(const std::optional<at::Tensor>& grad_z,
                                      const std::optional<at::Tensor>& grad_kl,
                                      const at::Tensor& mu, const at::Tensor& logvar,
                                      const std::optional<at::Tensor>& eps,
                                      const at::Tensor& rng_state,
                                      const at::Tensor& kl_position_mean, int64_t num_samples,
                                      int64_t reduction, double free_bits);

// ---- gaussian_recon_loss --------------------------------------------------------------------
void check_gaussian_recon_loss(const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction,
                               DtypeRule dtypes = DtypeRule::kSame);

// (B,) for "none", else a scalar, in loss_dtype.
at::Tensor allocate_recon_loss(const at::Tensor& x_hat, int64_t reduction);

// x_hat and x as the recon kernels read them: B rows of D elements each, in memory order. When
// x_hat is dense with the batch outermost (contiguous, channels_last, channels_last_3d, or any
// permutation of the non-batch dims: see rows_in_memory_order), it is read where it is, x too if
// it has the same layout (else x is copied into it), and the gradients are written in x_hat's
// layout; otherwise both are copied to contiguous memory and the gradients are contiguous. (A
// channels_last decoder output would otherwise cost permuting copies in each direction.) Within a
// sample the additions follow memory order, so a permuted layout may change the losses in the
// last bits; not the gradients. The gradients are allocated with the strides of the returned x_hat.
struct ReconOperands {
  at::Tensor x_hat, x;  // dense and laid out alike: B rows of D elements in memory order
};
ReconOperands recon_operands(const at::Tensor& x_hat, const at::Tensor& x);

void check_gaussian_recon_loss_backward(const at::Tensor& grad_loss, const at::Tensor& x_hat,
                                        const at::Tensor& x, int64_t reduction);
// The strides recon_operands gives x_hat, which the gradients (and grad_unit) are allocated with:
// x_hat's own when it is read in place, else contiguous ones. Without copying anything.
c10::DimVector recon_grad_strides(const at::Tensor& x_hat);

// gaussian_recon_loss_finish_grad_ (schema in csrc/ops.cpp): the backward's checks, a reduced
// loss, and grad_unit laid out like x_hat's gradient.
void check_gaussian_recon_loss_finish_grad(const at::Tensor& grad_unit, const at::Tensor& grad_loss,
                                            const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction);
// How gaussian_recon_loss_finish_grad_ turns a prepared gradient of this dtype into the one for
// an incoming gradient g other than 1: float32/float64 buffers are multiplied by g in place (one
// read and write of the buffer; within the last bit of the gradient computed from x_hat and x);
// 16-bit ones are computed anew from x_hat and x (multiplying a rounded 16-bit value would round
// twice, and float16 values may have lost their low bits among the subnormals that a loss scale
// avoids).
constexpr bool scales_prepared_grad(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble;
}

// ---- CUDA switches --------------------------------------------------------------------------
// Whether the CUDA forward kernels combine the per-block sums of a small grid inside one Hopper
// thread-block cluster (sm_90; csrc/cuda/cuda_common.cuh) instead of through the global ticket.
// On unless FASTELBO_CUDA_CLUSTERS=0 is in the environment when first asked. Both ways give the
// same bits; the switch is there to time one against the other and to test the ticket path on a
// Hopper GPU. set_cuda_clusters_enabled returns the previous setting.
bool cuda_clusters_enabled();
bool set_cuda_clusters_enabled(bool enabled);
// Whether the smallest flat CUDA reductions run as one block (no cross-block step at all;
// csrc/cuda/cuda_common.cuh, flat_reduction_grid) instead of the small-grid shape. On unless
// FASTELBO_CUDA_ONE_BLOCK=0 is in the environment when first asked. Unlike the cluster switch this
// changes the summation order, so reduced losses may differ in the last bits; the switch is there
// to time one shape against the other. set_cuda_one_block_enabled returns the previous setting.
bool cuda_one_block_enabled();
bool set_cuda_one_block_enabled(bool enabled);
// Whether the memory-bound CUDA grids past the small sizes run in blocks of up to 512 threads
// (csrc/cuda/cuda_common.cuh, large_block_grid) instead of 128. On unless
// FASTELBO_CUDA_LARGE_BLOCKS=0 is in the environment when first asked. Like the one-block switch
// it changes the summation order of the forward reductions; it is there to time one shape against
// the other. set_cuda_large_blocks_enabled returns the previous setting.
bool cuda_large_blocks_enabled();
bool set_cuda_large_blocks_enabled(bool enabled);
// Whether CUDA problems that give few threads work are spread over more
// (csrc/cuda/reparameterize_kl.cu, csrc/cuda/gaussian_recon.cu): free bits over a tall batch (the
// batch split over more blocks, free_bits_grid), reduction "none" on short samples (several per
// warp, the same bits), num_samples > 1 on a small latent (the draws over lanes: per chunk,
// draw_lanes; per window of a short sample, short_rows_lanes; per sample with free bits). Off,
// each runs in its kernel's plain shape. On unless FASTELBO_CUDA_SPREAD=0 is in the environment
// when first asked. It changes the summation order of free bits' per-position sums and of the
// many-draw loss and gradients; it is there to time one shape against the other.
// set_cuda_spread_enabled returns the previous setting.
bool cuda_spread_enabled();
bool set_cuda_spread_enabled(bool enabled);

#ifdef FASTELBO_WITH_CUDA
namespace cuda {
// The largest cluster (in blocks; 0: none) the float32 forward reducing kernel of each op can be
// launched as on `device` (tests check that Hopper GPUs do get the cluster path).
int64_t recon_forward_cluster_capacity(int device);
int64_t reparam_kl_forward_cluster_capacity(int device);
// The launch shape of the free-bits (columns) forward for B samples of D positions and
// num_samples draws; host-only, a function of the shape alone and of the spread switch (tests
// check its invariants without a GPU).
struct FreeBitsGrid {
  int col_windows = 1;         // TW windows of 4 positions per block
  int64_t col_tiles = 1;       // tiles of TW windows covering the D positions
  int64_t row_splits = 1;      // S: 1 = every block adds the whole batch (columns kernel)
  int64_t blocks = 1;
  int draw_shift = 0;          // 2^draw_shift lanes share each sample's num_samples draws
};
FreeBitsGrid free_bits_grid(int64_t batch, int64_t per_sample, int64_t num_samples = 1);
// The sample+KL kernels' lanes per chunk for num_samples draws of numel latent elements, as a
// power of two (the shift; 0: one lane, the plain kernels); host-only, like free_bits_grid.
int draw_lanes_shift(int64_t numel, int64_t num_samples);
// The short-rows forward's lanes (reduction "none", samples of at most 16 windows of 4 positions):
// window_lanes G per sample (0 when the samples are too long for it), and 2^draw_shift lanes per
// window sharing the window's num_samples draws; host-only, like free_bits_grid.
struct ShortRowsLanes {
  int window_lanes = 0;
  int draw_shift = 0;
};
ShortRowsLanes short_rows_lanes(int64_t batch, int64_t per_sample, int64_t num_samples);
}  // namespace cuda
#endif

}  // namespace fastelbo
