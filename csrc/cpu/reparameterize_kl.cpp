// CPU kernels of the fused reparameterized sample + Gaussian KL, forward and backward.
//
// Forward: one pass reads mu and logvar, writes z and reduces the KL. Backward: one pass reads
// grad_z, mu and logvar, regenerates eps from (seed, offset) and writes both gradients.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <mutex>

#include "../elbo_math.h"
#include "../fastelbo.h"
#include "cpu_common.h"

namespace fastelbo {
namespace cpu {
namespace {

// Pairwise (tree) sum of n <= kSubBlock values: error grows like log2(n), and the fixed-size
// halving loops vectorize.
template <typename acc_t>
acc_t pairwise_sum(const acc_t* values, int64_t n) {
  acc_t buffer[kSubBlock];
  // A copy and a fill (memcpy / memset speed); a single loop with `j < n ? values[j] : 0` here
  // compiled to a slow scalar loop that cost a third of the forward on 20-element rows.
  std::copy(values, values + n, buffer);
  std::fill(buffer + n, buffer + kSubBlock, acc_t(0));
  for (int64_t half = kSubBlock / 2; half > 0; half /= 2) {
    for (int64_t j = 0; j < half; ++j) buffer[j] += buffer[j + half];
  }
  return buffer[0];
}

template <typename scalar_t>
struct SampleArgs {
  const scalar_t* mu;
  const scalar_t* logvar;
  const scalar_t* eps;  // nullptr: draw from (seed, offset)
  scalar_t* z;
  int64_t numel;        // N: elements of mu, the stride between draws in z
  int64_t num_samples;  // K
  uint64_t seed;
  uint64_t offset;
};

// Length of the sub-block of elements starting at `first`: at most kSubBlock, ending at `end` or at
// the next multiple of `cut` (a sample boundary when the work is cut per sample), so that a
// sub-block lies in one sample and a sample's sub-blocks start at its first element.
inline int64_t sub_block_length(int64_t first, int64_t end, int64_t cut) {
  return std::min({kSubBlock, end - first, (first / cut + 1) * cut - first});
}

// Writes z for elements [begin, end) of every draw and hands the KL of each sub-block of elements
// to kl_sink(first, kl, n) (elements first .. first + n - 1): sums stay in registers that way.
// Sub-blocks never cross a multiple of `cut` (see sub_block_length).
template <typename scalar_t, typename acc_t, typename KLSink>
void sample_range(const SampleArgs<scalar_t>& a, int64_t begin, int64_t end, int64_t cut, KLSink&& kl_sink) {
  for (int64_t k = 0; k < a.num_samples; ++k) {
    NormalBlock<acc_t> normal(a.seed, a.offset + static_cast<uint64_t>(k), end);
    scalar_t* z = a.z + k * a.numel;
    const scalar_t* eps = a.eps ? a.eps + k * a.numel : nullptr;
    for (int64_t first = begin, n = 0; first < end; first += n) {
      n = sub_block_length(first, end, cut);
      // 16-bit data is converted a sub-block at a time (as_acc / acc_out / store_acc).
      acc_t logvar_block[kSubBlock], mu_block[kSubBlock], z_block[kSubBlock], std[kSubBlock];
      const acc_t* logvar = as_acc(a.logvar + first, n, logvar_block);
      const acc_t* mu = as_acc(a.mu + first, n, mu_block);
      acc_t* z_out = acc_out(z + first, z_block);
      posterior_std_block(logvar, n, std);
      acc_t e[kSubBlock], kl[kSubBlock];
      take_eps(eps, normal, first, n, e);
      // No calls and no branches that cannot become selects: this loop vectorizes.
      for (int64_t j = 0; j < n; ++j) {
        z_out[j] = math::reparameterized_sample(mu[j], std[j], e[j]);
        kl[j] = math::kl_element(mu[j], logvar[j], std[j]);
      }
      store_acc(z_out, n, z + first);
      if (k == 0) kl_sink(first, kl, n);
    }
  }
}

// The task grid of the free-bits forward (see reparameterize_kl_kernel): blocks of rows_per_block
// rows times chunks of kChunk columns. A block holds at least kChunk elements where the batch
// allows, and there are at most kMaxRowBlocks blocks, and at most kMaxPartials partial sums
// (row_blocks * D) in all. A function of (B, D) only.
struct FreeBitsGrid {
  static constexpr int64_t kMaxRowBlocks = 64;
  static constexpr int64_t kMaxPartials = int64_t(1) << 20;
  int64_t column_chunks, row_blocks, rows_per_block;
  int64_t grain;  // tasks per thread at the least, so that a small problem runs on the calling thread

  FreeBitsGrid(int64_t B, int64_t D) {
    column_chunks = (D + kChunk - 1) / kChunk;
    const int64_t min_rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, D));  // kChunk elements per block
    row_blocks = std::max<int64_t>(1, std::min({(B + min_rows - 1) / min_rows, kMaxRowBlocks,
                                                kMaxPartials / std::max<int64_t>(1, D)}));
    rows_per_block = (B + row_blocks - 1) / row_blocks;
    row_blocks = (B + rows_per_block - 1) / rows_per_block;  // no empty block at the end
    const int64_t elements_per_task = rows_per_block * std::min(D, kChunk);
    grain = std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, elements_per_task));
  }
  int64_t num_tasks() const { return row_blocks * column_chunks; }
};

template <typename scalar_t>
void reparameterize_kl_kernel(const SampleArgs<scalar_t>& args, const BatchLayout& layout,
                              int64_t reduction, double free_bits, at::Tensor& kl,
                              at::Tensor& kl_position_mean) {
  using acc_t = at::opmath_type<scalar_t>;
  const double scale = reduction_scale(reduction, layout);
  if (free_bits <= 0.0) {
    const BatchLayout work = task_layout(layout, reduction == kNone);
    const RowChunking chunking(work);
    reduce_rows_into<acc_t>(chunking, work, reduction, scale, kl, [&](int64_t task, acc_t* sums) {
      if (reduction == kNone && layout.per_sample < kSubBlock) {
        // Short samples: the task's samples are sampled as one run whose sub-blocks span several
        // of them (a sub-block per sample of a few elements cost a sub-block's set-up each), and
        // each sample's KL is added in element order.
        SampleSums<acc_t> sample_sums(layout.per_sample, sums);
        sample_range<scalar_t, acc_t>(args, chunking.begin(task), chunking.end(task), chunking.end(task),
                                      [&](int64_t /*first*/, const acc_t* kl, int64_t n) { sample_sums.add(kl, n); });
        return;
      }
      // Sub-block sums (in element order) cascaded per piece; sub-blocks never straddle two pieces
      // (a task's internal piece boundaries are sample boundaries, and sample_range cuts there).
      int64_t piece = chunking.first_piece(task);
      int64_t piece_end = chunking.piece_end(piece);
      CascadeSum<acc_t> sum;
      sample_range<scalar_t, acc_t>(args, chunking.begin(task), chunking.end(task), work.per_sample,
                                    [&](int64_t first, const acc_t* kl, int64_t n) {
                                      if (first >= piece_end) {  // the next piece starts here
                                        *sums++ = sum.sum();
                                        sum = CascadeSum<acc_t>();
                                        piece_end = chunking.piece_end(++piece);
                                      }
                                      sum.add(pairwise_sum(kl, n));
                                    });
      *sums = sum.sum();
    });
    return;
  }

  // Free bits: the floor applies to each position's batch-mean KL, so reduce over the batch per
  // position (column sums) instead of over positions per sample. The work is a grid of tasks:
  // blocks of consecutive rows (samples) times chunks of at most kChunk columns. A task adds its
  // rows in batch order, cascaded per column (ColumnCascadeSum), into its row block's partial
  // sums; the partials of each column are then added in row-block order (CascadeSum). The grid
  // depends on the shape only, so the sums do not depend on the thread count. Rows of a task that
  // spans whole rows are sampled as one run, so short rows (a few latent positions) do not each
  // pay for a run's set-up (its block of normals).
  const int64_t B = layout.batch, D = layout.per_sample;
  acc_t* position_mean = kl_position_mean.data_ptr<acc_t>();
  const FreeBitsGrid grid(B, D);
  std::vector<acc_t> partials(static_cast<size_t>(grid.row_blocks * D));
  at::parallel_for(0, grid.num_tasks(), grid.grain, [&](int64_t first_task, int64_t last_task) {
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t block = task / grid.column_chunks, chunk = task - block * grid.column_chunks;
      const int64_t r0 = block * grid.rows_per_block, r1 = std::min(B, r0 + grid.rows_per_block);
      const int64_t j0 = chunk * kChunk, j1 = std::min(D, j0 + kChunk);
      ColumnCascadeSum<acc_t> column_sum(j1 - j0);
      // kl of elements [first, first + n) of rows r0.. (row-major, columns j0..j1 of each row)
      int64_t column = 0;  // of the next element handed to the sink, relative to j0
      const auto add = [&](int64_t /*first*/, const acc_t* kl, int64_t n) {
        acc_t* row = column_sum.row();
        for (int64_t j = 0; j < n; ++j) {
          row[column] += kl[j];
          if (++column == j1 - j0) {
            column = 0;
            column_sum.end_row();
          }
        }
      };
      if (j0 == 0 && j1 == D) {  // whole rows: one run over the block
        sample_range<scalar_t, acc_t>(args, r0 * D, r1 * D, r1 * D, add);
      } else {
        for (int64_t b = r0; b < r1; ++b) sample_range<scalar_t, acc_t>(args, b * D + j0, b * D + j1, b * D + j1, add);
      }
      acc_t* block_sums = partials.data() + block * D;
      for (int64_t j = j0; j < j1; ++j) block_sums[j] = column_sum.sum(j - j0);
    }
  });
  for (int64_t j = 0; j < D; ++j) {
    CascadeSum<acc_t> column_total;
    for (int64_t block = 0; block < grid.row_blocks; ++block) column_total.add(partials[block * D + j]);
    position_mean[j] = column_total.sum() / static_cast<acc_t>(B);
  }
  // batchmean value: sum_j max(kbar_j, free_bits); other reductions scale it like the plain sum
  // (sum = B * that, mean = B / numel * that).
  CascadeSum<acc_t> floored;
  const acc_t floor_value = static_cast<acc_t>(free_bits);
  for (int64_t j = 0; j < D; ++j) floored.add(std::max(position_mean[j], floor_value));
  kl.data_ptr<acc_t>()[0] =
      static_cast<acc_t>(static_cast<double>(floored.sum()) * static_cast<double>(B) * scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparameterize_kl_cpu(
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    std::optional<at::Generator> generator, int64_t num_samples, int64_t reduction,
    double free_bits) {
  check_reparameterize_kl(mu, logvar, eps, num_samples, reduction, free_bits);
  ReparamKLOutputs out = allocate_reparameterize_kl(mu, num_samples, reduction, free_bits, &empty_output);
  const BatchLayout layout = batch_layout(mu);

  uint64_t seed = 0, offset = 0;
  if (!eps.has_value() && layout.numel > 0) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
    offset = gen->random64();
  }
  int64_t* rng = out.rng_state.data_ptr<int64_t>();
  rng[0] = static_cast<int64_t>(seed);
  rng[1] = static_cast<int64_t>(offset);

  if (layout.numel == 0) {  // empty batch: the reduction's identity, nothing to launch
    out.kl.zero_();
    out.kl_position_mean.zero_();
    return {out.z, out.kl, out.rng_state, out.kl_position_mean};
  }

  const at::Tensor mu_c = mu.contiguous(), logvar_c = logvar.contiguous();
  const at::Tensor eps_c = eps.has_value() ? eps->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_kl_cpu", [&] {
    SampleArgs<scalar_t> args{mu_c.const_data_ptr<scalar_t>(),
                              logvar_c.const_data_ptr<scalar_t>(),
                              eps_c.defined() ? eps_c.const_data_ptr<scalar_t>() : nullptr,
                              out.z.data_ptr<scalar_t>(),
                              layout.numel,
                              num_samples,
                              seed,
                              offset};
    reparameterize_kl_kernel<scalar_t>(args, layout, reduction, free_bits, out.kl, out.kl_position_mean);
  });
  return {out.z, out.kl, out.rng_state, out.kl_position_mean};
}

// ---- backward -----------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void reparameterize_kl_backward_kernel(const scalar_t* grad_z, const acc_t* grad_kl,
                                       bool grad_kl_per_sample, const scalar_t* mu,
                                       const scalar_t* logvar, const scalar_t* eps,
                                       uint64_t seed, uint64_t offset,
                                       const acc_t* position_mean, acc_t free_bits,
                                       const BatchLayout& layout, int64_t num_samples,
                                       double scale, scalar_t* grad_mu, scalar_t* grad_logvar) {
  // The gradients are elementwise, so the tensor is cut as one flat run whatever the reduction:
  // where the KL gradient differs by sample ("none") or by position (free bits), each element's
  // (sample, position) is tracked through the sub-block, which may span several short samples.
  const RowChunking chunking(task_layout(layout, false));
  const int64_t N = layout.numel, D = layout.per_sample;
  const bool kl_grad_varies = grad_kl && (grad_kl_per_sample || position_mean);
  const math::GradTerms terms{grad_z != nullptr, grad_kl != nullptr};
  chunking.for_each_task([&](int64_t task) {
    c10::SmallVector<NormalBlock<acc_t>, 2> normals;
    if (grad_z) {  // (nothing is drawn until a normal is taken: free when eps is given)
      for (int64_t k = 0; k < num_samples; ++k) {
        normals.emplace_back(seed, offset + static_cast<uint64_t>(k), chunking.end(task));
      }
    }
    for (int64_t first = chunking.begin(task), end = chunking.end(task), n = 0; first < end; first += n) {
      n = sub_block_length(first, end, chunking.per_sample());
      acc_t lv_block[kSubBlock], std[kSubBlock];
      const acc_t* lv = as_acc(logvar + first, n, lv_block);
      posterior_std_block(lv, n, std);
      // Sums over the draws of g and g * eps, draw by draw (the same order as one element at a
      // time), in loops without calls so that they vectorize.
      acc_t grad_z_sum[kSubBlock] = {}, grad_z_eps_sum[kSubBlock] = {};
      if (grad_z) {
        for (int64_t k = 0; k < num_samples; ++k) {
          acc_t e[kSubBlock];
          take_eps(eps ? eps + k * N : nullptr, normals[k], first, n, e);
          acc_t g_block[kSubBlock];
          const acc_t* g = as_acc(grad_z + k * N + first, n, g_block);
          for (int64_t j = 0; j < n; ++j) {
            grad_z_sum[j] += g[j];
            grad_z_eps_sum[j] += g[j] * e[j];
          }
        }
      }
      acc_t grad_kl_j[kSubBlock];
      if (!kl_grad_varies) {
        const acc_t grad_kl_all = grad_kl ? grad_kl[0] * static_cast<acc_t>(scale) : acc_t(0);
        for (int64_t j = 0; j < n; ++j) grad_kl_j[j] = grad_kl_all;
      } else {
        for (int64_t j = 0, b = first / D, column = first - b * D; j < n; ++j) {
          grad_kl_j[j] = grad_kl[grad_kl_per_sample ? b : 0] * static_cast<acc_t>(scale);
          // free bits: positions below the floor get no KL gradient
          if (position_mean && !math::free_bits_pass_gradient(position_mean[column], free_bits)) grad_kl_j[j] = 0;
          if (++column == D) {
            column = 0;
            ++b;
          }
        }
      }
      acc_t mu_block[kSubBlock], grad_mu_block[kSubBlock], grad_logvar_block[kSubBlock];
      const acc_t* m = as_acc(mu + first, n, mu_block);
      acc_t* g_mu = acc_out(grad_mu + first, grad_mu_block);
      acc_t* g_logvar = acc_out(grad_logvar + first, grad_logvar_block);
      for (int64_t j = 0; j < n; ++j) {
        g_mu[j] = math::grad_mu_element(m[j], grad_z_sum[j], grad_kl_j[j], terms);
        g_logvar[j] = math::grad_logvar_element(lv[j], std[j], grad_z_eps_sum[j], grad_kl_j[j], terms);
      }
      store_acc(g_mu, n, grad_mu + first);
      store_acc(g_logvar, n, grad_logvar + first);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward_cpu(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl,
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const at::Tensor& rng_state, const at::Tensor& kl_position_mean, int64_t num_samples,
    int64_t reduction, double free_bits) {
  check_reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, rng_state, kl_position_mean,
                                   num_samples, reduction, free_bits);
  at::Tensor grad_mu = empty_output(mu.sizes(), mu.options());
  at::Tensor grad_logvar = empty_output(logvar.sizes(), logvar.options());
  const BatchLayout layout = batch_layout(mu);
  if (layout.numel == 0) return {grad_mu, grad_logvar};

  const at::Tensor mu_c = mu.contiguous(), logvar_c = logvar.contiguous();
  const at::Tensor eps_c = eps.has_value() ? eps->contiguous() : at::Tensor();
  const at::Tensor grad_z_c = grad_z.has_value() ? grad_z->contiguous() : at::Tensor();
  const auto acc_dtype = loss_dtype(mu.scalar_type());
  const at::Tensor grad_kl_c =
      grad_kl.has_value() ? grad_kl->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor position_mean_c =
      free_bits > 0.0 ? kl_position_mean.to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor rng_c = rng_state.to(at::kCPU).contiguous();  // (read as two adjacent int64)
  const uint64_t seed = static_cast<uint64_t>(rng_c.const_data_ptr<int64_t>()[0]);
  const uint64_t offset = static_cast<uint64_t>(rng_c.const_data_ptr<int64_t>()[1]);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_kl_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    reparameterize_kl_backward_kernel<scalar_t, acc_t>(
        grad_z_c.defined() ? grad_z_c.const_data_ptr<scalar_t>() : nullptr,
        grad_kl_c.defined() ? grad_kl_c.const_data_ptr<acc_t>() : nullptr,
        reduction == kNone, mu_c.const_data_ptr<scalar_t>(), logvar_c.const_data_ptr<scalar_t>(),
        eps_c.defined() ? eps_c.const_data_ptr<scalar_t>() : nullptr, seed, offset,
        position_mean_c.defined() ? position_mean_c.const_data_ptr<acc_t>() : nullptr,
        static_cast<acc_t>(free_bits), layout, num_samples, reduction_scale(reduction, layout),
        grad_mu.data_ptr<scalar_t>(), grad_logvar.data_ptr<scalar_t>());
  });
  return {grad_mu, grad_logvar};
}

}  // namespace
}  // namespace cpu
}  // namespace fastelbo

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("reparameterize_kl", &fastelbo::cpu::reparameterize_kl_cpu);
  m.impl("reparameterize_kl_backward", &fastelbo::cpu::reparameterize_kl_backward_cpu);
}
