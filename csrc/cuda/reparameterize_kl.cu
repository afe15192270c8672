// CUDA kernels of the fused reparameterized sample + Gaussian KL, forward and backward.
//
// Forward, one launch: reads mu and logvar once, draws eps in registers (Philox4x32-10 +
// Box-Muller from csrc/elbo_math.h, the same counters as the CPU: element i of draw k uses group
// i / 4, lane i % 4, stream offset + k), writes z for every draw, and reduces the KL in the same
// kernel (per-block partials combined in block order by the last block, or inside one
// thread-block cluster for small grids on sm_90). Three shapes of it:
//   flat    "sum" / "mean" / "batchmean": the tensor as one flat run of 4-element chunks;
//   rows    "none": blocks never straddle two samples, so each per-sample sum has a fixed order
//           (short samples: a group of lanes per sample, several samples per warp);
//   columns free_bits > 0: per-position batch sums in a fixed order, the per-position means, and
//           the floored total sum_j max(kbar_j, lam), all in the one launch.
// Backward, one launch: reads grad_z, mu and logvar, regenerates eps from the saved (seed,
// offset) and writes grad_mu and grad_logvar.
//
// RNG (DESIGN.md section 5): (seed, offset) come from the CUDA generator through
// philox_cuda_state under the generator's mutex and are unpacked inside the kernel, so that a
// captured CUDA graph draws anew on every replay (the offset is then read from a device pointer);
// one thread writes the unpacked pair to rng_state, which the backward reads on the device.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <torch/library.h>

#include <mutex>
#include <tuple>

#include "cuda_common.cuh"

namespace fastelbo {
namespace cuda {
namespace {

// Elements per thread chunk in the flat kernels: one Philox group of 4 normals, read and written
// as one 16-byte access of float, two of double, one 8-byte access of half/bfloat16. (16-byte
// chunks of half/bfloat16 gave each thread two groups in a row: twice the Philox + Box-Muller
// latency chain per thread at small sizes, and register spills.)
constexpr int kChunk = 4;

// Rows and columns kernels work on windows of 4 consecutive positions of one sample.
constexpr int kWindow = 4;

template <typename scalar_t>
struct ForwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* mu;
  const scalar_t* logvar;
  const scalar_t* eps;    // nullptr: draw eps from (seed, offset)
  scalar_t* z;            // K draws of N elements
  acc_t* kl;              // (B,) for "none", else one element
  acc_t* position_mean;   // (D,) when free_bits > 0
  acc_t* partials;        // per-block (or per row tile) partial sums; unused by a 1-block grid
  int64_t* rng_state;     // (2,): the unpacked (seed, offset); zeros when eps is given
  at::PhiloxCudaState philox;
  int64_t numel;          // N = B * D
  int64_t batch;          // B
  int64_t per_sample;     // D
  int64_t num_samples;    // K
  double scale;           // reduction_scale()
  acc_t free_bits;
  bool vec;               // full chunks / windows may use vector accesses (alignment checked)
  unsigned int slot;      // ticket slot (see cuda_common.cuh)
  int64_t tiles_per_row;     // rows kernel: C tiles per sample
  int64_t windows_per_tile;  // rows kernel
  int col_windows;           // columns kernels: windows per block row (TW)
  int64_t row_splits;        // columns split kernel: S splits of the batch
  int row_lanes;             // short rows kernel: G lanes per sample (one per window)
  int draw_lanes_shift;      // draws kernels: 2^shift lanes per chunk; short rows kernel: per window;
                             // columns kernels: per sample (tile_column_sums' items)
};

// The 4 normals of elements [i0, i0 + 4) of draw stream `stream`. kGroupAligned: i0 % 4 == 0, so
// they are exactly one Philox group; otherwise they straddle two groups (sample sizes that are not
// a multiple of 4, in the rows and columns kernels) and both groups are drawn.
template <bool kGroupAligned, typename acc_t>
__device__ __forceinline__ void normals4(uint64_t seed, uint64_t stream, int64_t i0, acc_t* out) {
  const uint64_t group = static_cast<uint64_t>(i0) >> 2;
  const math::Normal4<acc_t> a = math::normal_group<acc_t>(seed, stream, group);
  const int shift = kGroupAligned ? 0 : static_cast<int>(i0 & 3);
  if (shift == 0) {
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = a.v[l];
    return;
  }
  const math::Normal4<acc_t> b = math::normal_group<acc_t>(seed, stream, group + 1);
  const acc_t both[8] = {a.v[0], a.v[1], a.v[2], a.v[3], b.v[0], b.v[1], b.v[2], b.v[3]};
#pragma unroll
  for (int l = 0; l < 4; ++l) {  // compile-time indices only: stays in registers
    acc_t v = both[l + 1];
    if (shift == 2) v = both[l + 2];
    if (shift == 3) v = both[l + 3];
    out[l] = v;
  }
}

// Calls use(e0, eps) for each group of 4 elements e0 .. e0 + 3 (e0 = 0, 4, .., R - 4) of the R
// elements at i0 of draw k, eps holding their 4 normals: read from `eps` when the caller gave it
// (only the first `count` unless kFull; the rest 0), else drawn from (seed, offset + k) by Philox
// + Box-Muller. One group at a time, so that only 4 normals are live at once.
template <bool kFull, bool kGroupAligned, int R, typename scalar_t, typename Use>
__device__ __forceinline__ void for_each_eps_group(const scalar_t* eps, int64_t numel, uint64_t seed,
                                                   uint64_t offset, int64_t k, int64_t i0, int count, Use&& use) {
  static_assert(R % 4 == 0, "runs cover whole 4-element Philox groups");
  using acc_t = at::opmath_type<scalar_t>;
  if (eps != nullptr) {
    const Packed<scalar_t, R> given = load_pack<kFull, R>(eps + k * numel + i0, count);
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      acc_t group[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) group[l] = to_acc<acc_t>(given.v[4 * q + l]);
      use(4 * q, group);
    }
  } else {
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      acc_t group[4];
      normals4<kGroupAligned>(seed, offset + static_cast<uint64_t>(k), i0 + 4 * q, group);
      use(4 * q, group);
    }
  }
}

// Writes z for the R elements at i0 (only the first `count` unless kFull) for draws first_draw,
// first_draw + draw_step, ... (every draw by default; first_draw < num_samples), and returns their
// KL values in kl (0 past `count`). kFull: aligned vector accesses.
template <bool kFull, bool kGroupAligned, int R, typename scalar_t, typename acc_t>
__device__ __forceinline__ void sample_run(const ForwardParams<scalar_t>& p, uint64_t seed,
                                           uint64_t offset, int64_t i0, int count, acc_t (&kl)[R],
                                           int64_t first_draw = 0, int64_t draw_step = 1) {
  const Packed<scalar_t, R> mu = load_pack<kFull, R>(p.mu + i0, count);
  const Packed<scalar_t, R> logvar = load_pack<kFull, R>(p.logvar + i0, count);
  // The normals of draw k into eps (one group of 4 at a time).
  acc_t eps[R];
  auto draw = [&](int64_t k) {
    for_each_eps_group<kFull, kGroupAligned, R>(p.eps, p.numel, seed, offset, k, i0, count,
                                                [&](int e0, const acc_t (&group)[4]) {
#pragma unroll
      for (int l = 0; l < 4; ++l) eps[e0 + l] = group[l];
    });
  };
  // The first draw's normals before anything that reads mu or logvar: their Philox + Box-Muller
  // work needs no memory and runs while the loads are in flight. (Computed after the loads'
  // first use, exp(logvar / 2), the thread waited out the whole load latency first, then did that
  // work: the compiler does not move it across the branches of the draw loop.)
  draw(first_draw);
  // exp(logvar / 2) once per element, for every draw and the KL (the compiler did not share it).
  acc_t std[R];
#pragma unroll
  for (int e = 0; e < R; ++e) std[e] = math::posterior_std(to_acc<acc_t>(logvar.v[e]));
  for (int64_t k = first_draw; k < p.num_samples; k += draw_step) {
    if (k > first_draw) draw(k);
    acc_t z[R];
#pragma unroll
    for (int e = 0; e < R; ++e) z[e] = math::reparameterized_sample(to_acc<acc_t>(mu.v[e]), std[e], eps[e]);
    store_pack<kFull, R>(p.z + k * p.numel + i0, z, count);
  }
#pragma unroll
  for (int e = 0; e < R; ++e) {
    kl[e] = kFull || e < count ? math::kl_element(to_acc<acc_t>(mu.v[e]), to_acc<acc_t>(logvar.v[e]), std[e])
                               : acc_t(0);
  }
}

// A 4-position window of one sample, at flat index i0 with `count` (1..4) positions in the sample,
// draws first_draw, first_draw + draw_step, ... (all of them by default; see sample_run); picks
// the vector / group-aligned variant. Sample sizes that are a multiple of 4 never have a partial
// window, so the variants are: vector, scalar aligned (unaligned pointers), scalar straddling (odd
// sample sizes).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void sample_window(const ForwardParams<scalar_t>& p, uint64_t seed,
                                              uint64_t offset, int64_t i0, int count,
                                              acc_t (&kl)[kWindow], int64_t first_draw = 0,
                                              int64_t draw_step = 1) {
  if (p.vec) {  // implies per_sample % 4 == 0 and aligned pointers
    sample_run<true, true>(p, seed, offset, i0, count, kl, first_draw, draw_step);
  } else if (p.per_sample % 4 == 0) {
    sample_run<false, true>(p, seed, offset, i0, count, kl, first_draw, draw_step);
  } else {
    sample_run<false, false>(p, seed, offset, i0, count, kl, first_draw, draw_step);
  }
}

template <typename scalar_t>
__device__ __forceinline__ std::tuple<uint64_t, uint64_t> unpack_and_record(
    const ForwardParams<scalar_t>& p) {
  // eps given: philox is default-constructed, so this unpacks to (0, 0), the documented zeros.
  const auto seeds = at::cuda::philox::unpack(p.philox);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.rng_state[0] = static_cast<int64_t>(std::get<0>(seeds));
    p.rng_state[1] = static_cast<int64_t>(std::get<1>(seeds));
  }
  return seeds;
}

// ---- forward: flat ("sum", "mean", "batchmean") ---------------------------------------------
// The grid's KL sum over 2^shift lanes per 4-element chunk: item t of the grid is lane q = t % Q
// of chunk t / Q, which draws q, q + Q, ... of the chunk (each lane reads the chunk's mu and
// logvar); the KL is lane 0's. shift 0 (the flat kernel, a compile-time 0): one thread per chunk
// drawing all its draws, the arithmetic folded to that.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t flat_kl_sum(const ForwardParams<scalar_t>& p, uint64_t seed, uint64_t offset,
                                             int shift) {
  constexpr int E = kChunk;
  const int64_t n = p.numel;
  const int64_t num_chunks = (n + E - 1) / E, full_chunks = p.vec ? n / E : 0;
  const int64_t items = num_chunks << shift;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  acc_t sum = 0;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += stride) {
    const int64_t c = t >> shift, q = t - (c << shift);
    const int64_t i0 = c * E;
    acc_t kl[E];
    if (c < full_chunks) {
      sample_run<true, true>(p, seed, offset, i0, E, kl, q, int64_t{1} << shift);
    } else {
      sample_run<false, true>(p, seed, offset, i0, static_cast<int>(min64(E, n - i0)), kl, q, int64_t{1} << shift);
    }
    if (q == 0) {
#pragma unroll
      for (int e = 0; e < E; ++e) sum += kl[e];
    }
  }
  return sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxFlatThreads<scalar_t>, kMinFlatBlocksPerSM<scalar_t>)
    reparam_kl_forward_flat_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto seeds = unpack_and_record(p);
  const acc_t sum = flat_kl_sum<scalar_t, acc_t>(p, std::get<0>(seeds), std::get<1>(seeds), 0);
  write_grid_sum(sum, p.kl, p.partials, p.slot, p.scale);
}

// ---- forward: flat, the draws over lanes (num_samples > 1 on a small latent) --------------------
// The flat kernel's thread draws its chunk's K normals one draw after another, so on a small latent
// with many draws ((128, 20) with K = 50: 640 threads, 50 Philox + Box-Muller chains in a row each)
// that chain is the kernel's time. Here Q = 2^draw_lanes_shift lanes (draw_lanes) take each chunk
// (flat_kl_sum). z has the bits of the flat kernel's; the KL's sum runs over the items in a fixed
// order (another grid than the flat kernel's, so the loss may differ from it in the last bits). Up
// to 16 blocks reduce inside a cluster on sm_90, as the flat kernel's small grids do. A kernel of
// its own, so that the flat kernel's code stays that of a compile-time single lane.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<scalar_t>)
    reparam_kl_forward_draws_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto seeds = unpack_and_record(p);
  const acc_t sum = flat_kl_sum<scalar_t, acc_t>(p, std::get<0>(seeds), std::get<1>(seeds), p.draw_lanes_shift);
  write_grid_sum(sum, p.kl, p.partials, p.slot, p.scale);
}

// ---- forward: rows ("none") -----------------------------------------------------------------
// Segment s = (sample b, tile c) of C tiles per sample; a block sums one segment at a time, in
// windows of 4 positions. Per-sample sums via store_segment / finish_rows (cuda_common.cuh).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<scalar_t>)
    reparam_kl_forward_rows_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto seeds = unpack_and_record(p);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  const int64_t d = p.per_sample, tiles = p.tiles_per_row;
  const int64_t windows = (d + kWindow - 1) / kWindow;
  const int64_t segments = p.batch * tiles;
  for (int64_t s = blockIdx.x; s < segments; s += gridDim.x) {
    const int64_t b = s / tiles, tile = s - b * tiles;
    const int64_t w_begin = tile * p.windows_per_tile;
    const int64_t w_end = min64(w_begin + p.windows_per_tile, windows);
    acc_t sum = 0;
    for (int64_t w = w_begin + threadIdx.x; w < w_end; w += blockDim.x) {
      const int64_t j0 = w * kWindow;
      acc_t kl[kWindow];
      sample_window(p, seed, offset, b * d + j0, static_cast<int>(min64(kWindow, d - j0)), kl);
#pragma unroll
      for (int e = 0; e < kWindow; ++e) sum += kl[e];
    }
    sum = block_sum(sum);
    store_segment(sum, p.kl, p.partials, s, b, tiles);
  }
  finish_rows(p.kl, p.partials, p.batch, tiles, p.slot);
}

// How many of the 4 positions of the window at position j0 of a sample of d positions exist (0: the
// window is past the sample's end).
__device__ __forceinline__ int window_count(int64_t j0, int64_t d) {
  return j0 < d ? static_cast<int>(min64(kWindow, d - j0)) : 0;
}

// ---- forward: short rows ("none", samples of at most kMaxShortRowWindows windows) ------------
// The rows kernel gives each sample a block of at least a warp, one thread per window: a sample of
// a few windows left most of the warp idle, and a tall batch of them ran as many samples one after
// another per block ((2^21, 1): 1 thread of 32 working, about 500 samples in a row). Here a group
// of G lanes (a power of two >= the windows, at most 16) takes a sample, 128 / G samples per block
// pass. Each sample's sum has the bits the rows kernel gives it: lane w adds window w's 4 values in
// order, and the butterfly over the G lanes adds what the warp's butterfly adds (there the lanes
// past G add zeros, exactly).
// With several draws (K > 1) each window has Q = 2^draw_lanes_shift lanes, lane w * Q + q taking
// draws q, q + Q, ... of window w (Q = 1: one lane takes all K, one after another). Only lane q = 0
// adds the window's KL; the others add zeros. The group_sum's butterfly first adds lanes Q, 2Q, ...
// apart, which is the window butterfly above on the q = 0 lanes (and zeros on the others), then
// the zeros of the q > 0 lanes: the same bits again.
constexpr int64_t kMaxShortRowWindows = 16;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<scalar_t>)
    reparam_kl_forward_short_rows_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto seeds = unpack_and_record(p);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  const int64_t d = p.per_sample;
  const int shift = p.draw_lanes_shift;
  short_rows_sums(p.kl, p.batch, p.row_lanes << shift, [&](int64_t b, int lane) {  // lane w * Q + q
    const int q = lane & ((1 << shift) - 1);
    const int64_t j0 = static_cast<int64_t>(lane >> shift) * kWindow;
    const int count = window_count(j0, d);
    acc_t sum = 0;
    if (count > 0) {
      acc_t kl[kWindow];
      sample_window(p, seed, offset, b * d + j0, count, kl, q, int64_t{1} << shift);
      if (q == 0) {
#pragma unroll
        for (int e = 0; e < kWindow; ++e) sum += kl[e];
      }
    }
    return sum;
  });
}

// ---- forward: columns (free bits) -----------------------------------------------------------
// A block covers col_windows (TW) windows of 4 positions; its threads are TB = blockDim / TW lanes
// over the batch (tile_column_sums). The per-position sums are divided by B (kl_position_mean),
// floored at lam and summed; the blocks' floored sums are combined by the last block. A tall batch
// of few positions is split over more blocks (the split kernel below). All orders fixed by the
// shape.

// The sums over samples of the positions of one window per TW. The batch is walked as B x Q items
// (Q = 2^draw_lanes_shift; 1 unless several draws spread over lanes): item i is sample i / Q's
// draws i % Q, i % Q + Q, ... of the window (sample_run), and only the items with i % Q == 0 add
// the sample's KL. Thread (x, y) covers window x's positions j0 .. j0 + count - 1 (count 0: past
// the last window) as lane y, taking items first_row + y, first_row + y + row_step, ...
// (first_row < row_step) and adding their KL in order with Kahan's compensated summation; then
// the TB lane sums of each position are added pairwise (lane l + TB/2 onto lane l, and so on). On
// return lane_sums[x][e] holds position j0 + e's sum, for thread y == 0, which
// wrote it (no barrier needed to read it). Every thread of the block must call it: it has two
// barriers, the first of which lets a caller reuse lane_sums from one call to the next. (A lane's
// running sum over a large batch loses digits: on the CPU B = 2^24 rows of 0.1 came out 15% off in
// float32. A float32 simulation of this kernel's orders put 2^22 such rows 2e-6 off with plain
// running sums and a two-level cascade in the lanes, the lanes added one after another;
// compensated lanes added pairwise are exact there. Compensation holds fewer registers than a
// deeper cascade, which spilled.)
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_column_sums(const ForwardParams<scalar_t>& p, uint64_t seed,
                                                 uint64_t offset, int64_t j0, int count, int64_t first_row,
                                                 int64_t row_step, acc_t (&lane_sums)[kThreads][kWindow]) {
  const int64_t d = p.per_sample;
  const int tw = p.col_windows, tb = static_cast<int>(blockDim.x) / tw;  // both powers of two
  const int x = static_cast<int>(threadIdx.x) % tw, y = static_cast<int>(threadIdx.x) / tw;
  const int shift = p.draw_lanes_shift;
  acc_t col[kWindow] = {};
  if (count > 0) {
    acc_t lost[kWindow] = {};  // Kahan: what the rounding of col dropped, subtracted next time
    for (int64_t i = first_row + y; i < (p.batch << shift); i += row_step) {
      const int64_t b = i >> shift, q = i & ((int64_t{1} << shift) - 1);
      acc_t kl[kWindow];
      sample_window(p, seed, offset, b * d + j0, count, kl, q, int64_t{1} << shift);
      if (q != 0) continue;  // the sample's KL is its q = 0 item's
#pragma unroll
      for (int e = 0; e < kWindow; ++e) {
        const acc_t term = kl[e] - lost[e];
        const acc_t sum = col[e] + term;
        // (an infinite sum keeps no compensation: inf - inf would turn it into NaN)
        lost[e] = isfinite(sum) ? (sum - col[e]) - term : acc_t(0);
        col[e] = sum;
      }
    }
  }
  __syncthreads();  // the previous call's lane sums have been read
#pragma unroll
  for (int e = 0; e < kWindow; ++e) lane_sums[threadIdx.x][e] = col[e];
  __syncthreads();
  if (y == 0) {  // thread x adds up column x's lanes, in place: no other thread touches them
#pragma unroll
    for (int e = 0; e < kWindow; ++e) {
      if (e < count) {
        for (int half = tb / 2; half > 0; half /= 2) {
          for (int lane = 0; lane < half; ++lane) lane_sums[lane * tw + x][e] += lane_sums[(lane + half) * tw + x][e];
        }
      }
    }
  }
}

// Window x of column tile t: its first position.
__device__ __forceinline__ int64_t tile_window_start(int64_t t, int tw, int x) { return (t * tw + x) * kWindow; }

// Tiles of tw windows that cover d positions (the host's FreeBitsGrid::col_tiles).
__device__ __forceinline__ int64_t column_tiles(int64_t d, int tw) { return ((d + kWindow - 1) / kWindow + tw - 1) / tw; }

// Position j's batch mean from its sum over the batch, stored in position_mean (the backward's
// gradient gate); returns it floored at lam, the position's term of the loss. Both columns
// kernels end each position so.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t floored_position_mean(const ForwardParams<scalar_t>& p, int64_t j, acc_t sum) {
  const acc_t mean = sum / static_cast<acc_t>(p.batch);
  p.position_mean[j] = mean;
  return max_keep_nan(mean, p.free_bits);
}

// The floored loss from the floored sum sum_j max(kbar_j, lam): as on the CPU, the batchmean
// value times B, times the reduction's scale.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_floored_kl(const ForwardParams<scalar_t>& p, acc_t floored_total) {
  p.kl[0] = static_cast<acc_t>(static_cast<double>(floored_total) * static_cast<double>(p.batch) * p.scale);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<scalar_t>)
    reparam_kl_forward_columns_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t lane_sums[kThreads][kWindow];
  const auto seeds = unpack_and_record(p);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  const int64_t d = p.per_sample;
  const int tw = p.col_windows;
  const int x = static_cast<int>(threadIdx.x) % tw, y = static_cast<int>(threadIdx.x) / tw;
  const int64_t col_tiles = column_tiles(d, tw);
  acc_t floored = 0;
  for (int64_t t = blockIdx.x; t < col_tiles; t += gridDim.x) {
    const int64_t j0 = tile_window_start(t, tw, x);
    const int count = window_count(j0, d);
    tile_column_sums(p, seed, offset, j0, count, 0, static_cast<int64_t>(blockDim.x) / tw, lane_sums);
    if (y == 0) {
#pragma unroll
      for (int e = 0; e < kWindow; ++e) {
        if (e < count) floored += floored_position_mean(p, j0 + e, lane_sums[x][e]);
      }
    }
  }
  floored = block_sum(floored);
  grid_total(floored, p.partials, p.slot, [&](acc_t total) { write_floored_kl(p, total); });
}

// ---- forward: columns split over the batch (free bits, tall batches) --------------------------
// With few positions the columns kernel has few tiles (B = 2^16 samples of 20 positions: 2 blocks),
// and each lane adds thousands of samples one after another. Here the batch is dealt out to S
// splits: block (tile t, split r) adds samples r TB + y, r TB + y + S TB, ... of its tile in lane y
// as the columns kernel adds the whole batch, and stores each position's sum in
// partials[r * D + j]. The last block to finish adds each position's S split sums in split order
// (a group of `lanes` threads per position, each compensated, then a fixed butterfly, as
// finish_rows adds a sample's tiles), then divides, floors and sums as the columns kernel does. All
// orders fixed by the shape.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<scalar_t>)
    reparam_kl_forward_columns_split_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t lane_sums[kThreads][kWindow];
  const auto seeds = unpack_and_record(p);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  const int64_t d = p.per_sample, splits = p.row_splits;
  const int tw = p.col_windows, tb = static_cast<int>(blockDim.x) / tw;
  const int x = static_cast<int>(threadIdx.x) % tw, y = static_cast<int>(threadIdx.x) / tw;
  const int64_t segments = column_tiles(d, tw) * splits;
  // Segment s = (tile t, split r). The host launches one block per segment; written as a
  // grid-stride loop all the same, the form in which ptxas keeps the sums in registers (as one
  // straight pass it spilled them to local memory on every sample, at the same 64 registers).
  for (int64_t s = blockIdx.x; s < segments; s += gridDim.x) {
    const int64_t t = s / splits, r = s - t * splits;
    const int64_t j0 = tile_window_start(t, tw, x);
    const int count = window_count(j0, d);
    tile_column_sums(p, seed, offset, j0, count, r * tb, splits * tb, lane_sums);
    if (y == 0) {
#pragma unroll
      for (int e = 0; e < kWindow; ++e) {
        if (e < count) p.partials[r * d + j0 + e] = lane_sums[x][e];
      }
    }
  }
  // The ticket releases thread 0's writes; the other writers' are made visible first.
  if (y == 0) __threadfence();
  unsigned int* counter = &ticket_counters[p.slot];
  if (!take_ticket_is_last(counter)) return;
  // The last block: `lanes` threads per position (lanes * positions per pass <= blockDim.x).
  const int lanes = finish_rows_lanes(d, blockDim.x);
  const int64_t per_pass = blockDim.x / lanes;
  const int lane = static_cast<int>(threadIdx.x % lanes);
  acc_t floored = 0;
  for (int64_t j_first = 0; j_first < d; j_first += per_pass) {  // the same passes in every thread
    const int64_t j = j_first + threadIdx.x / lanes;
    const acc_t v = group_sum(
        j < d ? sum_partials</*kCompensated=*/true>(p.partials + j, lane * d, splits * d, lanes * d) : acc_t(0), lanes);
    if (lane == 0 && j < d) floored += floored_position_mean(p, j, v);
  }
  floored = block_sum(floored);
  if (threadIdx.x == 0) {
    reset_ticket(counter);
    write_floored_kl(p, floored);
  }
}

// ---- backward -------------------------------------------------------------------------------
template <typename scalar_t>
struct BackwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_z;   // nullptr: z gets no gradient
  bool grad_z_broadcast;    // grad_z is one value seen through stride-0 dims (a sum's backward)
  const void* grad_kl;      // nullptr: kl gets no gradient; else read as grad_kl_dtype
  AnyFloat grad_kl_dtype;
  bool grad_kl_per_sample;  // "none": grad_kl[b * grad_kl_stride]
  int64_t grad_kl_stride;
  const scalar_t* mu;
  const scalar_t* logvar;
  const scalar_t* eps;         // nullptr: regenerate from rng_state
  const int64_t* rng_state;    // (seed, offset) on the device
  const acc_t* position_mean;  // free bits: positions below the floor get no KL gradient
  acc_t free_bits;
  acc_t scale;
  int64_t numel, per_sample, num_samples;
  scalar_t* grad_mu;
  scalar_t* grad_logvar;
  bool vec;
  int draw_lanes_shift;  // draws kernel: 2^shift lanes per chunk
};

// Adds, for draws first_draw, first_draw + draw_step, ... of the E elements of one chunk at i0
// (only the first `count` unless kFull), grad_z into grad_z_sum and grad_z * eps into
// grad_z_eps_sum, draw after draw.
template <bool kFull, int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_draw_terms(const BackwardParams<scalar_t>& p, uint64_t seed, uint64_t offset,
                                               acc_t grad_z_all, int64_t i0, int count, int64_t first_draw,
                                               int64_t draw_step, acc_t (&grad_z_sum)[E],
                                               acc_t (&grad_z_eps_sum)[E]) {
  for (int64_t k = first_draw; k < p.num_samples; k += draw_step) {
    acc_t g[E];
    if (p.grad_z_broadcast) {
#pragma unroll
      for (int e = 0; e < E; ++e) g[e] = grad_z_all;
    } else {
      const Packed<scalar_t, E> raw = load_pack<kFull, E>(p.grad_z + k * p.numel + i0, count);
#pragma unroll
      for (int e = 0; e < E; ++e) g[e] = to_acc<acc_t>(raw.v[e]);
    }
    for_each_eps_group<kFull, true, E>(p.eps, p.numel, seed, offset, k, i0, count,
                                       [&](int e0, const acc_t (&eps)[4]) {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        grad_z_sum[e0 + l] += g[e0 + l];
        grad_z_eps_sum[e0 + l] += g[e0 + l] * eps[l];
      }
    });
  }
}

// Writes the gradients of the E elements of one chunk at i0 (only the first `count` unless
// kFull) from mu, logvar and the draws' summed terms. pos: the (sample, position) of i0, used when
// track_rows.
template <bool kFull, int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_chunk_grads(const BackwardParams<scalar_t>& p, acc_t grad_kl_all,
                                                  bool track_rows, RowPos pos, int64_t i0, int count,
                                                  const Packed<scalar_t, E>& mu, const Packed<scalar_t, E>& logvar,
                                                  const acc_t (&grad_z_sum)[E], const acc_t (&grad_z_eps_sum)[E]) {
  acc_t grad_kl[E];
  if (!track_rows) {
#pragma unroll
    for (int e = 0; e < E; ++e) grad_kl[e] = grad_kl_all;
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      acc_t g = 0;
      if (kFull || e < count) {
        g = p.grad_kl_per_sample
                ? load_any<acc_t>(p.grad_kl, p.grad_kl_dtype, pos.row * p.grad_kl_stride) * p.scale
                : grad_kl_all;
        // Free bits: positions whose batch-mean KL is below the floor get no KL gradient.
        if (p.position_mean != nullptr && !math::free_bits_pass_gradient(p.position_mean[pos.col], p.free_bits)) g = 0;
      }
      grad_kl[e] = g;
      pos.next(p.per_sample);
    }
  }
  const math::GradTerms terms{p.grad_z != nullptr, p.grad_kl != nullptr};
  acc_t grad_mu[E], grad_logvar[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    grad_mu[e] = math::grad_mu_element(to_acc<acc_t>(mu.v[e]), grad_z_sum[e], grad_kl[e], terms);
    grad_logvar[e] = math::grad_logvar_element(to_acc<acc_t>(logvar.v[e]), grad_z_eps_sum[e], grad_kl[e], terms);
  }
  store_pack<kFull, E>(p.grad_mu + i0, grad_mu, count);
  store_pack<kFull, E>(p.grad_logvar + i0, grad_logvar, count);
}

// Gradients of the E elements of one chunk at i0 (only the first `count` unless kFull). pos: the
// (sample, position) of i0, used when track_rows.
template <bool kFull, int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void backward_chunk(const BackwardParams<scalar_t>& p, uint64_t seed,
                                               uint64_t offset, acc_t grad_z_all, acc_t grad_kl_all,
                                               bool track_rows, RowPos pos, int64_t i0, int count) {
  // mu and logvar are loaded first, so that their latency overlaps the Philox + Box-Muller work
  // below (the compiler does not move loads above the loop over the draws).
  const Packed<scalar_t, E> mu = load_pack<kFull, E>(p.mu + i0, count);
  const Packed<scalar_t, E> logvar = load_pack<kFull, E>(p.logvar + i0, count);
  acc_t grad_z_sum[E] = {}, grad_z_eps_sum[E] = {};
  if (p.grad_z != nullptr) add_draw_terms<kFull, E>(p, seed, offset, grad_z_all, i0, count, 0, 1, grad_z_sum, grad_z_eps_sum);
  write_chunk_grads<kFull, E>(p, grad_kl_all, track_rows, pos, i0, count, mu, logvar, grad_z_sum, grad_z_eps_sum);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kLargeBlockThreads, kLargeBlocksPerSM<scalar_t>)
    reparam_kl_backward_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int E = kChunk;
  const int64_t n = p.numel, d = p.per_sample;
  uint64_t seed = 0, offset = 0;
  if (p.grad_z != nullptr && p.eps == nullptr) {
    seed = static_cast<uint64_t>(p.rng_state[0]);
    offset = static_cast<uint64_t>(p.rng_state[1]);
  }
  const bool track_rows = p.grad_kl != nullptr && (p.grad_kl_per_sample || p.position_mean != nullptr);
  const acc_t grad_kl_all = p.grad_kl != nullptr && !p.grad_kl_per_sample
                                ? load_any<acc_t>(p.grad_kl, p.grad_kl_dtype, 0) * p.scale
                                : acc_t(0);
  const acc_t grad_z_all = p.grad_z_broadcast ? to_acc<acc_t>(p.grad_z[0]) : acc_t(0);
  const int64_t num_chunks = (n + E - 1) / E, full_chunks = p.vec ? n / E : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // (sample, position) of the thread's chunk, advanced by the grid stride without divisions.
  RowPos pos{0, 0};
  int64_t step_rows = 0, step_cols = 0;
  if (track_rows && c < num_chunks) {
    pos = row_pos(c * E, d);
    step_rows = stride * E / d;
    step_cols = stride * E - step_rows * d;
  }
  for (; c < num_chunks; c += stride) {
    const int64_t i0 = c * E;
    if (c < full_chunks) {
      backward_chunk<true, E>(p, seed, offset, grad_z_all, grad_kl_all, track_rows, pos, i0, E);
    } else {
      backward_chunk<false, E>(p, seed, offset, grad_z_all, grad_kl_all, track_rows, pos, i0,
                               static_cast<int>(min64(E, n - i0)));
    }
    if (track_rows) pos.advance(step_rows, step_cols, d);
  }
}

// The backward with the draws over lanes (num_samples > 1 on a small latent; see the forward's
// draws kernel): lane q of a chunk regenerates draws q, q + Q, ... and adds their terms; the Q
// lanes' sums are added by a fixed butterfly (a chunk's lanes are adjacent in one warp: Q <= 32),
// and lane 0 writes the chunk's gradients. Only with grad_z (without it there are no draws).
// Its first lines (seed, offset, the one-value incoming gradients) repeat the plain kernel's on
// purpose: read through one shared helper, they changed the plain backward's sm_90 code (32 more
// instructions in float), which no GPU run has timed.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<scalar_t>)
    reparam_kl_backward_draws_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int E = kChunk;
  const int64_t n = p.numel, d = p.per_sample;
  uint64_t seed = 0, offset = 0;
  if (p.eps == nullptr) {
    seed = static_cast<uint64_t>(p.rng_state[0]);
    offset = static_cast<uint64_t>(p.rng_state[1]);
  }
  const bool track_rows = p.grad_kl != nullptr && (p.grad_kl_per_sample || p.position_mean != nullptr);
  const acc_t grad_kl_all = p.grad_kl != nullptr && !p.grad_kl_per_sample
                                ? load_any<acc_t>(p.grad_kl, p.grad_kl_dtype, 0) * p.scale
                                : acc_t(0);
  const acc_t grad_z_all = p.grad_z_broadcast ? to_acc<acc_t>(p.grad_z[0]) : acc_t(0);
  const int shift = p.draw_lanes_shift;
  const int lanes = 1 << shift;
  const int64_t num_chunks = (n + E - 1) / E, full_chunks = p.vec ? n / E : 0;
  const int64_t items = num_chunks << shift;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Block-uniform passes: every lane of every warp reaches every shuffle.
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x; t0 < items; t0 += stride) {
    const int64_t t = t0 + threadIdx.x;
    const int64_t c = t >> shift, q = t - (c << shift);
    const int64_t i0 = c * E;
    const int count = static_cast<int>(min64(E, n - i0));  // (<= 0 past the last chunk: no work)
    // Lane 0's mu and logvar are loaded first, so that their latency overlaps the draws.
    Packed<scalar_t, E> mu{}, logvar{};
    if (t < items && q == 0) {
      if (c < full_chunks) {
        mu = load_pack<true, E>(p.mu + i0, E);
        logvar = load_pack<true, E>(p.logvar + i0, E);
      } else {
        mu = load_pack<false, E>(p.mu + i0, count);
        logvar = load_pack<false, E>(p.logvar + i0, count);
      }
    }
    acc_t grad_z_sum[E] = {}, grad_z_eps_sum[E] = {};
    if (t < items) {
      if (c < full_chunks) {
        add_draw_terms<true, E>(p, seed, offset, grad_z_all, i0, E, q, lanes, grad_z_sum, grad_z_eps_sum);
      } else {
        add_draw_terms<false, E>(p, seed, offset, grad_z_all, i0, count, q, lanes, grad_z_sum, grad_z_eps_sum);
      }
    }
    // (group_sum's butterfly, level by level over all 2E sums: their shuffles in flight together)
    for (int lane_mask = lanes / 2; lane_mask > 0; lane_mask >>= 1) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        grad_z_sum[e] += __shfl_xor_sync(0xffffffffu, grad_z_sum[e], lane_mask);
        grad_z_eps_sum[e] += __shfl_xor_sync(0xffffffffu, grad_z_eps_sum[e], lane_mask);
      }
    }
    if (t < items && q == 0) {
      const RowPos pos = track_rows ? row_pos(i0, d) : RowPos{0, 0};
      if (c < full_chunks) {
        write_chunk_grads<true, E>(p, grad_kl_all, track_rows, pos, i0, E, mu, logvar, grad_z_sum, grad_z_eps_sum);
      } else {
        write_chunk_grads<false, E>(p, grad_kl_all, track_rows, pos, i0, count, mu, logvar, grad_z_sum, grad_z_eps_sum);
      }
    }
  }
}

// ---- host -----------------------------------------------------------------------------------

}  // namespace

// Lanes (as a power of two: the shift) that share the K draws of one unit of work (a chunk, or a
// short sample's window) which one thread would otherwise draw in a row: up to K and max_lanes,
// while the units times the lanes stay within one wave of kThreads-thread blocks. 0: one lane (one
// draw, the spread switch off, or units that fill the GPU by themselves).
namespace {
int spread_draws_shift(int64_t units, int64_t num_samples, int64_t max_lanes) {
  if (num_samples < 2 || !cuda_spread_enabled()) return 0;
  int shift = 0;
  while ((int64_t{2} << shift) <= std::min(num_samples, max_lanes) &&
         (units << (shift + 1)) <= kMaxBlocks * kThreads) {
    ++shift;
  }
  return shift;
}
}  // namespace

// Columns (free bits): TW windows per block; narrower tiles (more lanes over the batch, more
// blocks) while the grid is small and the batch can feed the lanes. A lane that would still add
// more than kColumnRowsPerLane samples (items, below) has the batch split over up to kMaxBlocks blocks in all
// (the split kernel), with at most kMaxColumnPartials split sums for its last block to add: at
// most a few rounds of kPartialBatch loads per thread when they spread over the block. (Off with
// the spread switch, csrc/fastelbo.h: the columns kernel alone, for timing.) Several draws on a
// small latent: each sample is Q items (tile_column_sums), Q lanes sharing its draws, while the
// samples' windows times Q fit one wave; the grid is then shaped for B x Q items.
FreeBitsGrid free_bits_grid(int64_t batch, int64_t per_sample, int64_t num_samples) {
  constexpr int64_t kColumnRowsPerLane = 4;
  constexpr int64_t kMaxColumnPartials = int64_t{kThreads} * kPartialBatch * 4;
  const int64_t windows = ceil_div(per_sample, kWindow);
  FreeBitsGrid grid;
  grid.draw_shift = spread_draws_shift(batch * windows, num_samples, 32);
  const int64_t items = batch << grid.draw_shift;
  int tw = 1;
  while (tw < 32 && tw < windows) tw *= 2;
  while (tw > 4 && ceil_div(windows, tw) * 2 <= kMaxBlocks && kThreads / tw < items) tw /= 2;
  grid.col_windows = tw;
  grid.col_tiles = ceil_div(windows, tw);
  const int64_t lanes = kThreads / tw;
  const int64_t splits = std::min({ceil_div(items, lanes * kColumnRowsPerLane), kMaxBlocks / grid.col_tiles,
                                   kMaxColumnPartials / std::max<int64_t>(per_sample, 1)});
  grid.row_splits = cuda_spread_enabled() ? std::max<int64_t>(splits, 1) : 1;
  grid.blocks = grid.row_splits == 1 ? std::min<int64_t>(grid.col_tiles, kMaxBlocks) : grid.col_tiles * grid.row_splits;
  return grid;
}

// The flat kernels' draws over lanes (a small latent with many draws): up to 32 lanes per chunk.
int draw_lanes_shift(int64_t numel, int64_t num_samples) {
  return spread_draws_shift(ceil_div(numel, kChunk), num_samples, 32);
}

// The short-rows kernel: G lanes per sample (a power of two >= its windows), and lanes per window
// for the draws while a sample's lanes stay within a warp (group_sum).
ShortRowsLanes short_rows_lanes(int64_t batch, int64_t per_sample, int64_t num_samples) {
  const int64_t windows = ceil_div(per_sample, kWindow);
  ShortRowsLanes lanes;
  if (windows > kMaxShortRowWindows || !cuda_spread_enabled()) return lanes;
  lanes.window_lanes = 1;
  while (lanes.window_lanes < windows) lanes.window_lanes *= 2;
  lanes.draw_shift = spread_draws_shift(batch * lanes.window_lanes, num_samples, 32 / lanes.window_lanes);
  return lanes;
}

namespace {

template <typename scalar_t>
void launch_forward(ForwardParams<scalar_t> p, int64_t reduction, double free_bits,
                    const at::Tensor& mu, cudaStream_t stream) {
  const int64_t n = p.numel, batch = p.batch, d = p.per_sample, k = p.num_samples;
  const int64_t windows = ceil_div(d, kWindow);
  const size_t window_align = kPackedAlign<scalar_t, kWindow>;
  const bool windows_vec = d % kWindow == 0 && all_aligned({p.mu, p.logvar, p.eps, p.z}, window_align);

  if (free_bits > 0.0) {
    const FreeBitsGrid grid = free_bits_grid(batch, d, k);
    p.col_windows = grid.col_windows;
    p.row_splits = grid.row_splits;
    p.draw_lanes_shift = grid.draw_shift;
    p.vec = windows_vec;
    if (grid.row_splits == 1) {
      launch_reducing_kernel<reparam_kl_forward_columns_kernel<scalar_t>>(grid.blocks, kThreads, grid.blocks, false,
                                                                          p, mu.options(), stream);
    } else {  // partials: S split sums per position
      launch_reducing_kernel<reparam_kl_forward_columns_split_kernel<scalar_t>>(
          grid.blocks, kThreads, d * grid.row_splits, false, p, mu.options(), stream);
    }
  } else if (const ShortRowsLanes lanes = short_rows_lanes(batch, d, k);
             reduction == kNone && lanes.window_lanes > 0) {
    p.row_lanes = lanes.window_lanes;
    p.draw_lanes_shift = lanes.draw_shift;
    p.vec = windows_vec;
    const int64_t blocks =
        std::min<int64_t>(ceil_div(batch, kThreads / (lanes.window_lanes << lanes.draw_shift)), kMaxBlocks);
    launch_on_grid<reparam_kl_forward_short_rows_kernel<scalar_t>>(FlatGrid{blocks, kThreads}, stream, p);
  } else if (reduction == kNone) {
    const RowsGrid grid = rows_grid(batch, windows, 1);
    p.windows_per_tile = grid.windows_per_tile;
    p.tiles_per_row = grid.tiles;
    p.vec = windows_vec;
    launch_reducing_kernel<reparam_kl_forward_rows_kernel<scalar_t>>(
        grid.blocks, grid.threads, grid.tiles > 1 ? grid.blocks : 1 /* 1 tile: no ticket */, false, p, mu.options(),
        stream);
  } else {
    constexpr int E = kChunk;
    // Vector chunks: every pointer, and with several draws every draw's start, chunk-aligned.
    const size_t chunk_align = kPackedAlign<scalar_t, E>;
    p.vec = all_aligned({p.mu, p.logvar, p.eps, p.z}, chunk_align) &&
            (k == 1 || (n * static_cast<int64_t>(sizeof(scalar_t))) % static_cast<int64_t>(chunk_align) == 0);
    const int shift = draw_lanes_shift(n, k);
    if (shift > 0) {
      p.draw_lanes_shift = shift;
      const int64_t blocks = std::min<int64_t>(ceil_div(ceil_div(n, E) << shift, kThreads), kMaxBlocks);
      launch_reducing_kernel<reparam_kl_forward_draws_kernel<scalar_t>>(blocks, kThreads, blocks, true, p,
                                                                        mu.options(), stream);
    } else {
      const FlatGrid grid = flat_reduction_grid<scalar_t>(ceil_div(n, E), 1);
      launch_reducing_kernel<reparam_kl_forward_flat_kernel<scalar_t>>(grid.blocks, grid.threads, grid.blocks, true,
                                                                       p, mu.options(), stream);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparameterize_kl_cuda(
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    std::optional<at::Generator> generator, int64_t num_samples, int64_t reduction,
    double free_bits) {
  check_reparameterize_kl(mu, logvar, eps, num_samples, reduction, free_bits);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  ReparamKLOutputs out = allocate_reparameterize_kl(mu, num_samples, reduction, free_bits);
  const BatchLayout layout = batch_layout(mu);
  if (layout.numel == 0) {  // empty: the reduction's identity; no draw, no kernel
    out.kl.zero_();
    out.kl_position_mean.zero_();
    out.rng_state.zero_();
    return {out.z, out.kl, out.rng_state, out.kl_position_mean};
  }

  at::PhiloxCudaState philox;  // default: unpacks to (0, 0), written as rng_state when eps is given
  if (!eps.has_value()) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(mu.device().index()));
    // torch.Generator(device="cuda") has no device index (its state is a seed and an offset, not
    // tied to one card): it serves any CUDA device, as it does for torch's own ops. One made for a
    // numbered device must be on mu's.
    const c10::Device gen_device = gen->device();
    TORCH_CHECK(!gen_device.has_index() || gen_device.index() == mu.device().index(),
                "reparameterize_kl: generator must be on mu's device (", mu.device(),
                "), got a generator on ", gen_device);
    // Draw k uses Philox stream offset + k, k < K; torch's CUDA generator wants increments that
    // are multiples of 4.
    const uint64_t increment = 4 * static_cast<uint64_t>((num_samples + 3) / 4);
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(increment);
  }

  const at::Tensor mu_c = mu.contiguous(), logvar_c = logvar.contiguous();
  const at::Tensor eps_c = eps.has_value() ? eps->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardParams<scalar_t> p{};
    p.mu = mu_c.const_data_ptr<scalar_t>();
    p.logvar = logvar_c.const_data_ptr<scalar_t>();
    p.eps = eps_c.defined() ? eps_c.const_data_ptr<scalar_t>() : nullptr;
    p.z = out.z.data_ptr<scalar_t>();
    p.kl = out.kl.data_ptr<acc_t>();
    p.position_mean = free_bits > 0.0 ? out.kl_position_mean.data_ptr<acc_t>() : nullptr;
    p.rng_state = out.rng_state.data_ptr<int64_t>();
    p.philox = philox;
    p.numel = layout.numel;
    p.batch = layout.batch;
    p.per_sample = layout.per_sample;
    p.num_samples = num_samples;
    p.scale = reduction_scale(reduction, layout);
    p.free_bits = static_cast<acc_t>(free_bits);
    launch_forward<scalar_t>(p, reduction, free_bits, mu, stream);
  });
  return {out.z, out.kl, out.rng_state, out.kl_position_mean};
}

// A gradient that is one value seen through stride-0 dims (what the backward of z.sum() hands
// over): read as that one value instead of materializing it with a copy kernel.
bool is_broadcast_scalar(const at::Tensor& t) {
  if (t.numel() == 0) return false;
  for (int64_t dim = 0; dim < t.dim(); ++dim) {
    if (t.size(dim) > 1 && t.stride(dim) != 0) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward_cuda(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl,
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const at::Tensor& rng_state, const at::Tensor& kl_position_mean, int64_t num_samples,
    int64_t reduction, double free_bits) {
  check_reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, rng_state, kl_position_mean,
                                   num_samples, reduction, free_bits);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  at::Tensor grad_mu = at::empty_like(mu, at::MemoryFormat::Contiguous);
  at::Tensor grad_logvar = at::empty_like(logvar, at::MemoryFormat::Contiguous);
  const BatchLayout layout = batch_layout(mu);
  if (layout.numel == 0) return {grad_mu, grad_logvar};

  const at::Tensor mu_c = mu.contiguous(), logvar_c = logvar.contiguous();
  const bool has_grad_z = grad_z.has_value() && grad_z->defined();
  const bool has_grad_kl = grad_kl.has_value() && grad_kl->defined();
  const bool grad_z_broadcast = has_grad_z && is_broadcast_scalar(*grad_z);
  const at::Tensor grad_z_c = has_grad_z ? (grad_z_broadcast ? *grad_z : grad_z->contiguous()) : at::Tensor();
  // eps and rng_state matter only for the z gradient.
  const at::Tensor eps_c = has_grad_z && eps.has_value() ? eps->contiguous() : at::Tensor();
  const at::Tensor rng_c = rng_state.contiguous();
  const auto acc_dtype = loss_dtype(mu.scalar_type());
  at::Tensor position_mean_c;
  if (free_bits > 0.0 && has_grad_kl) {
    position_mean_c = kl_position_mean.to(acc_dtype).contiguous();  // no-op for the forward's own
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_kl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int E = kChunk;
    BackwardParams<scalar_t> p{};
    p.grad_z = has_grad_z ? grad_z_c.const_data_ptr<scalar_t>() : nullptr;
    p.grad_z_broadcast = grad_z_broadcast;
    p.grad_kl = has_grad_kl ? grad_kl->const_data_ptr() : nullptr;
    p.grad_kl_dtype = has_grad_kl ? any_float_code(grad_kl->scalar_type()) : AnyFloat::kFloat;
    p.grad_kl_per_sample = has_grad_kl && reduction == kNone;
    p.grad_kl_stride = p.grad_kl_per_sample ? grad_kl->stride(0) : 0;
    p.mu = mu_c.const_data_ptr<scalar_t>();
    p.logvar = logvar_c.const_data_ptr<scalar_t>();
    p.eps = eps_c.defined() ? eps_c.const_data_ptr<scalar_t>() : nullptr;
    p.rng_state = rng_c.const_data_ptr<int64_t>();
    p.position_mean = position_mean_c.defined() ? position_mean_c.const_data_ptr<acc_t>() : nullptr;
    p.free_bits = static_cast<acc_t>(free_bits);
    p.scale = static_cast<acc_t>(reduction_scale(reduction, layout));
    p.numel = layout.numel;
    p.per_sample = layout.per_sample;
    p.num_samples = num_samples;
    p.grad_mu = grad_mu.data_ptr<scalar_t>();
    p.grad_logvar = grad_logvar.data_ptr<scalar_t>();
    const bool dense_grad_z = has_grad_z && !grad_z_broadcast;
    const size_t chunk_align = kPackedAlign<scalar_t, E>;
    p.vec = all_aligned({p.mu, p.logvar, p.eps, dense_grad_z ? static_cast<const void*>(p.grad_z) : nullptr,
                         p.grad_mu, p.grad_logvar},
                        chunk_align) &&
            (num_samples == 1 ||
             (layout.numel * static_cast<int64_t>(sizeof(scalar_t))) % static_cast<int64_t>(chunk_align) == 0);
    // The draws over lanes only when there are draws to spread (grad_z given); the forward's choice
    // does not bind the backward (it regenerates eps by index).
    const int shift = has_grad_z ? draw_lanes_shift(layout.numel, num_samples) : 0;
    if (shift > 0) {
      p.draw_lanes_shift = shift;
      const int64_t blocks = std::min<int64_t>(ceil_div(ceil_div(layout.numel, E) << shift, kThreads), kMaxBlocks);
      launch_on_grid<reparam_kl_backward_draws_kernel<scalar_t>>(FlatGrid{blocks, kThreads}, stream, p);
    } else {
      launch_on_grid<reparam_kl_backward_kernel<scalar_t>>(large_block_grid(ceil_div(layout.numel, E)), stream, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_mu, grad_logvar};
}

}  // namespace

int64_t reparam_kl_forward_cluster_capacity(int device) {
  const c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device));
  return cluster_capacity<reparam_kl_forward_flat_kernel<float>>(device, at::cuda::getCurrentCUDAStream());
}

}  // namespace cuda
}  // namespace fastelbo

TORCH_LIBRARY_IMPL(fastelbo, CUDA, m) {
  m.impl("reparameterize_kl", &fastelbo::cuda::reparameterize_kl_cuda);
  m.impl("reparameterize_kl_backward", &fastelbo::cuda::reparameterize_kl_backward_cuda);
}
