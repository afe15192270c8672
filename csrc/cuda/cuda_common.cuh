// Building blocks shared by fastelbo's CUDA kernels: launch shape, 16-byte vector access, the
// deterministic block reduction, and the two ways the per-block sums of a grid are combined: the
// "last block combines" ticket (any GPU) and, for the small grids, a Hopper thread-block cluster.
//
// Determinism. Every reduced result is combined in an order that depends only on the problem size:
// each thread adds its elements in a fixed order, a block adds its threads with a fixed butterfly
// (warp shuffles) and then its warps in order, and one block adds the per-block partials in block
// order: the block that finishes last (an integer atomic ticket), or, when the whole grid is one
// thread-block cluster (sm_90), the cluster's first block reading the others' shared memory. Both
// ways do the same additions in the same order, so they give the same bits. No floating-point
// atomics: the same inputs give the same bits on every run, for any interleaving of the blocks.
//
// The grid depends only on the problem size (kThreads, kMaxBlocks are constants tuned for the
// 132-SM H100/H200), never on the device, so the summation order is fixed too. Three process-wide
// switches (FASTELBO_CUDA_ONE_BLOCK, FASTELBO_CUDA_LARGE_BLOCKS, FASTELBO_CUDA_SPREAD, all
// on by default; there to time one shape against the other) also choose the shape, so bits are
// compared under one setting.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <type_traits>
#include <mutex>
#include <utility>

#include "../elbo_math.h"
#include "../fastelbo.h"

namespace fastelbo {
namespace cuda {

// ---- launch shape ---------------------------------------------------------------------------

// Threads per block of every kernel (the "rows" kernels use fewer on short rows: a multiple of 32).
constexpr int kThreads = 128;
// Resident blocks per SM the kernels are compiled for (__launch_bounds__): 8 x 128 threads at <= 64
// registers. double kernels (not a speed target) get 4, so that their libm calls do not spill.
template <typename scalar_t>
constexpr int kMinBlocksPerSM = sizeof(scalar_t) == 8 ? 4 : 8;
// Grid cap of the grid-stride kernels: one wave of 128-thread blocks at 8 blocks per SM on a
// 132-SM H100/H200 (kernels are built for <= 64 registers per thread so that 8 blocks fit). Large
// tensors are walked by a grid-stride loop, small ones get one element chunk per thread.
constexpr int64_t kMaxBlocks = 132 * 8;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t round_up_warp(int64_t v) { return std::max<int64_t>(32, (v + 31) / 32 * 32); }

// Blocks for `work` independent items, one item per thread, at most kMaxBlocks (grid-stride beyond).
inline int64_t flat_blocks(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), kMaxBlocks));
}

// A launch shape: blocks of `threads` threads.
struct FlatGrid {
  int64_t blocks;
  int64_t threads;
};

// Large blocks. The memory-bound grids (the flat forward reductions past the small sizes, the
// backward kernels) use blocks of up to kLargeBlockThreads threads, four times kThreads, at the
// same register budget and so the same threads per SM: one wave is 264 blocks of 512 threads
// instead of 1056 of 128. A grid costs more the bigger it is even when it does nothing:
// on an H100 the finish kernel, whose blocks all return at once in the usual loss.backward(),
// took 1.11 us on 16 blocks of 128 threads, 1.20 on 196, 1.50 on 768 and 1.66-1.73 on 1056, and
// the recon forward at ldm-ae-256 (1056 blocks) kept its SMs busy for 70% of its time
// (benches/RESULTS.md, H100 run 2). Those grids grew in blocks and warps together; fewer, larger
// blocks bet that blocks are what costs to launch (not timed yet). FASTELBO_CUDA_LARGE_BLOCKS=0
// (cuda_large_blocks_enabled) gives these grids flat_blocks' shape, to time one against the other.
constexpr int kLargeBlockThreads = 512;
template <typename scalar_t>
constexpr int kLargeBlocksPerSM = kMinBlocksPerSM<scalar_t> * kThreads / kLargeBlockThreads;
static_assert(kLargeBlocksPerSM<float> * kLargeBlockThreads == kMinBlocksPerSM<float> * kThreads &&
                  kLargeBlocksPerSM<double> * kLargeBlockThreads == kMinBlocksPerSM<double> * kThreads,
              "large blocks keep the threads per SM, and so the register budget, of kThreads blocks");
// Blocks a grid keeps while it can: two per SM of a 132-SM H100/H200, so that a grid below one
// wave still spreads its work evenly over every SM.
constexpr int64_t kMinLargeGrid = kMaxBlocks / 4;

// Launch shape for `work` independent items, one per thread up to one wave of kMaxBlocks *
// kThreads threads (grid-stride beyond): the widest blocks of kThreads, 2 * kThreads or
// kLargeBlockThreads threads that still make kMinLargeGrid blocks. Up to 67,328 items (where 256
// threads would make fewer) and with the switch off, flat_blocks' shape. Size only (for a given
// setting of the switch): a fixed summation order for the reducing kernels.
inline FlatGrid large_block_grid(int64_t work) {
  if (!cuda_large_blocks_enabled()) return FlatGrid{flat_blocks(work), kThreads};
  int64_t threads = kLargeBlockThreads;
  while (threads > kThreads && ceil_div(work, threads) < kMinLargeGrid) threads /= 2;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, threads), kMaxBlocks * kThreads / threads));
  return FlatGrid{blocks, threads};
}

// Launches kKernel(params) on `grid`, on `stream` (a plain launch: no cluster).
template <auto kKernel, typename Params>
void launch_on_grid(const FlatGrid& grid, cudaStream_t stream, const Params& params) {
  kKernel<<<static_cast<unsigned int>(grid.blocks), static_cast<unsigned int>(grid.threads), 0, stream>>>(params);
}

// Small grids. A reduction over a big grid pays, after its last load, for the ticket: a fence, an
// atomic round trip to L2 and the partials read back through L2, a chain of several hundred
// nanoseconds in every forward kernel (on the H200, recon forward took 1.7 us more than the recon
// backward that reads the same bytes at (128, 784)). Small problems are therefore given at most
// kMaxClusterBlocks blocks of up to kMaxClusterThreads threads: few enough partials to be combined
// inside one thread-block cluster on sm_90 (no global memory, no atomics; see grid_total), and
// still spread over 16 SMs for bandwidth.
constexpr int64_t kMaxClusterBlocks = 16;
constexpr int64_t kMaxClusterThreads = 512;
// The smallest problems skip the cross-block step altogether: one block, one chunk per thread,
// while the chunks fit in kMaxOneBlockThreads threads (512 for double, whose kernels keep their
// register budget). On an H100 that step cost about 1 us, cluster and ticket alike: the sample+KL
// forward took 2.0 us as one 64-thread block and 3.0 us as a cluster of four 128-thread blocks
// with the same work per thread (benches/RESULTS.md, "Where the small steps' kernel time goes").
// FASTELBO_CUDA_ONE_BLOCK=0 (cuda_one_block_enabled) gives these sizes the small-grid shape
// instead, to time one against the other.
template <typename scalar_t>
constexpr int64_t kMaxOneBlockThreads = sizeof(scalar_t) == 8 ? 512 : 1024;
// The flat reducing kernels are compiled for blocks of up to kMaxFlatThreads threads (the one
// block's, the larger shape) at the register budget of kThreads x kMinBlocksPerSM (64 per thread
// for float, 128 for double), so the big grids' code is unchanged.
template <typename scalar_t>
constexpr int kMaxFlatThreads = static_cast<int>(kMaxOneBlockThreads<scalar_t>);
static_assert(kMaxOneBlockThreads<double> >= kMaxClusterThreads, "cluster blocks fit the flat kernels' bounds");
template <typename scalar_t>
constexpr int kMinFlatBlocksPerSM = kMinBlocksPerSM<scalar_t> * kThreads / kMaxFlatThreads<scalar_t>;
static_assert(kMinFlatBlocksPerSM<float> == 1 && kMinFlatBlocksPerSM<double> == 1,
              "one wide block per SM at the narrow kernels' register budget");

// Launch shape of a flat reducing kernel over `chunks` work items of scalar_t data whose threads
// take up to `per_thread` of them in one pass: one block of a thread per item while that fits in
// kMaxOneBlockThreads (unless cuda_one_block_enabled() says no); else the small-grid shape (a block
// per kThreads items, at most kMaxClusterBlocks blocks, each of a multiple of 32 threads up to
// kMaxClusterThreads) when that covers every item in one pass; else large_block_grid's shape.
// Size only (for a given setting of the switch): fixed order.
template <typename scalar_t>
inline FlatGrid flat_reduction_grid(int64_t chunks, int64_t per_thread) {
  if (chunks <= kMaxOneBlockThreads<scalar_t> && cuda_one_block_enabled()) {
    return FlatGrid{1, round_up_warp(chunks)};
  }
  if (chunks <= kMaxClusterBlocks * kMaxClusterThreads * per_thread) {
    FlatGrid g;
    g.blocks = std::max<int64_t>(1, std::min(kMaxClusterBlocks, ceil_div(chunks, kThreads)));
    g.threads = std::min(kMaxClusterThreads, round_up_warp(ceil_div(chunks, g.blocks)));
    return g;
  }
  return large_block_grid(chunks);
}

inline bool is_aligned(const void* p, size_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

// Whether every pointer that is given (not nullptr) is aligned: the condition of the vector paths.
inline bool all_aligned(std::initializer_list<const void*> pointers, size_t alignment) {
  for (const void* ptr : pointers) {
    if (ptr != nullptr && !is_aligned(ptr, alignment)) return false;
  }
  return true;
}

// Launch shape of a "rows" kernel (reduction "none"): each sample's `windows` windows are cut into
// `tiles` tiles of windows_per_tile windows, a block sums one (sample, tile) segment at a time, and
// each thread takes windows_per_thread windows per pass. Short samples get fewer threads (a
// multiple of 32); a small batch gets several tiles per sample (at most one wave of blocks), whose
// sums the last block adds (finish_rows). Depends on the problem size only: fixed summation order.
struct RowsGrid {
  int64_t threads;
  int64_t tiles;
  int64_t windows_per_tile;
  int64_t blocks;
};

inline RowsGrid rows_grid(int64_t batch, int64_t windows, int64_t windows_per_thread) {
  RowsGrid g;
  g.threads = std::min<int64_t>(kThreads, round_up_warp(ceil_div(windows, windows_per_thread)));
  int64_t tiles = 1;
  if (batch < kMaxBlocks) {
    tiles = std::max<int64_t>(1, std::min(ceil_div(windows, g.threads * windows_per_thread), kMaxBlocks / batch));
  }
  g.windows_per_tile = ceil_div(windows, tiles);
  g.tiles = ceil_div(windows, g.windows_per_tile);  // no empty tile
  g.blocks = g.tiles > 1 ? batch * g.tiles /* <= kMaxBlocks */ : std::min<int64_t>(batch, 4 * kMaxBlocks);
  return g;
}

// ---- vector access --------------------------------------------------------------------------

// Elements per 16-byte access: 4 float, 2 double, 8 half/bfloat16.
template <typename scalar_t>
constexpr int kPack = static_cast<int>(16 / sizeof(scalar_t));

// N consecutive elements loaded or stored as one (or, for 32 bytes, two) aligned vector accesses.
template <typename T, int N>
struct alignas(N * sizeof(T) >= 16 ? 16 : N * sizeof(T)) Packed {
  T v[N];
};

template <typename T, int N>
constexpr size_t kPackedAlign = alignof(Packed<T, N>);

inline __host__ __device__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Storage -> compute type. For half/bfloat16 straight from the bits (c10's conversion operators
// take the address of the value, which keeps register arrays in local memory).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}
template <>
__device__ __forceinline__ float to_acc<float, at::BFloat16>(at::BFloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.x) << 16);
}
template <>
__device__ __forceinline__ float to_acc<float, at::Half>(at::Half v) {
  return __half2float(__ushort_as_half(v.x));
}

// N consecutive elements at p, kept in their storage type (half the registers of float for
// half/bfloat16) and converted at the point of use. kFull: one aligned vector access (the caller
// checked alignment); else only the first `count` elements are read (the rest are zero).
template <bool kFull, int N, typename scalar_t>
__device__ __forceinline__ Packed<scalar_t, N> load_pack(const scalar_t* __restrict__ p, int count) {
  Packed<scalar_t, N> r;
  if constexpr (kFull) {
    r = *reinterpret_cast<const Packed<scalar_t, N>*>(p);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) r.v[e] = e < count ? p[e] : static_cast<scalar_t>(0.0f);
  }
  return r;
}

// The U chunk pairs (a, b) at chunk indices c, c + step, ..., c + (U - 1) step that are below
// `end`, E elements each, as aligned vector loads, all issued before any is used (U loads of
// each in flight per thread). Chunks at or past `end` are left unset: test the index before use.
template <int U, int E, typename scalar_t>
__device__ __forceinline__ void load_chunk_pairs(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                                 int64_t c, int64_t step, int64_t end,
                                                 Packed<scalar_t, E> (&a_out)[U], Packed<scalar_t, E> (&b_out)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (c + u * step < end) {
      a_out[u] = load_pack<true, E>(a + (c + u * step) * E, E);
      b_out[u] = load_pack<true, E>(b + (c + u * step) * E, E);
    }
  }
}

// Stores N values at p: one aligned vector access when kFull, else only the first `count`.
template <bool kFull, int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ p, const acc_t (&in)[N], int count) {
  if constexpr (kFull) {
    Packed<scalar_t, N> v;
#pragma unroll
    for (int e = 0; e < N; ++e) v.v[e] = static_cast<scalar_t>(in[e]);
    *reinterpret_cast<Packed<scalar_t, N>*>(p) = v;
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      if (e < count) p[e] = static_cast<scalar_t>(in[e]);
    }
  }
}

// One element of a tensor of any supported floating dtype (grad_kl, grad_loss: the incoming
// gradients may come in any float dtype and with any stride, e.g. the stride-0 ones of a sum's
// backward), converted to acc_t. Read on the device: no host sync, no conversion kernel.
enum class AnyFloat : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

inline AnyFloat any_float_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return AnyFloat::kFloat;
    case at::kDouble: return AnyFloat::kDouble;
    case at::kHalf: return AnyFloat::kHalf;
    case at::kBFloat16: return AnyFloat::kBFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "fastelbo: unsupported gradient dtype ", t);
  return AnyFloat::kFloat;
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_any(const void* p, AnyFloat code, int64_t index) {
  switch (code) {
    case AnyFloat::kDouble: return static_cast<acc_t>(static_cast<const double*>(p)[index]);
    case AnyFloat::kHalf: return static_cast<acc_t>(to_acc<float>(static_cast<const at::Half*>(p)[index]));
    case AnyFloat::kBFloat16: return static_cast<acc_t>(to_acc<float>(static_cast<const at::BFloat16*>(p)[index]));
    default: return static_cast<acc_t>(static_cast<const float*>(p)[index]);
  }
}

// max(a, b) that propagates a NaN in a, as std::max(a, b) does on the CPU (fmax would drop it).
template <typename acc_t>
__device__ __forceinline__ acc_t max_keep_nan(acc_t a, acc_t b) {
  return a < b ? b : a;
}

// (row, column) of a flat index in a (batch, per_sample) tensor, advanced without divisions.
struct RowPos {
  int64_t row;
  int64_t col;
  __device__ __forceinline__ void next(int64_t per_sample) {
    if (++col == per_sample) {
      col = 0;
      ++row;
    }
  }
  // Moves forward by step = step_rows * per_sample + step_cols (step_cols < per_sample).
  __device__ __forceinline__ void advance(int64_t step_rows, int64_t step_cols, int64_t per_sample) {
    row += step_rows;
    col += step_cols;
    if (col >= per_sample) {
      col -= per_sample;
      ++row;
    }
  }
};

__device__ __forceinline__ RowPos row_pos(int64_t index, int64_t per_sample) {
  const int64_t row = index / per_sample;
  return RowPos{row, index - row * per_sample};
}

// ---- deterministic reductions ---------------------------------------------------------------

// Ticket counters per slot (see "ticket slots" below for who uses which slot).
constexpr unsigned int kTicketSlots = 16384;
constexpr unsigned int kEagerSlots = 1024;

// The ticket counters of one translation unit: zero-initialized device memory, one instance per
// device. Internal linkage: each .cu file that includes this header has its own array.
static __device__ unsigned int ticket_counters[kTicketSlots];


template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, lane_mask);
  }
  return v;
}

// Sum of v over each aligned group of `lanes` lanes (a power of two up to 32) by a fixed butterfly,
// valid in every lane of the group. Every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int lanes) {
  for (int lane_mask = lanes / 2; lane_mask > 0; lane_mask >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, lane_mask);  // stays within the aligned group of `lanes`
  }
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32), valid in thread 0. Every thread must
// call it. A fixed butterfly within each warp, then the warps in order: deterministic.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = static_cast<int>(blockDim.x >> 5);
    v = lane < num_warps ? warp_sums[lane] : acc_t(0);
    v = warp_sum(v);
  }
  return v;
}

// *counter += 1 at GPU scope with acquire-release semantics, returning the old value: releases the
// calling thread's earlier writes and acquires those released by earlier increments. (Cheaper than
// the sequentially consistent __threadfence() before and after a relaxed atomicAdd.)
__device__ __forceinline__ unsigned int increment_acq_rel(unsigned int* counter) {
  unsigned int old;
  asm volatile("atom.acq_rel.gpu.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
  return old;
}

// The "last block combines" ticket. After thread 0 of every block has written its partial(s),
// each block's thread 0 takes a ticket from an integer counter (acquire-release: the partials it
// wrote are released with it); the block that draws gridDim.x - 1 has acquired every partial
// (its threads read them after the block barrier, through L2) and combines them, then resets the
// counter to 0 for the next launch in its slot. Returns, in every thread, whether this block is
// the last one. Every thread must call it.
__device__ __forceinline__ bool take_ticket_is_last(unsigned int* counter) {
  __shared__ bool is_last;
  __syncthreads();  // thread 0's partial store comes after the whole block's work
  if (threadIdx.x == 0) is_last = increment_acq_rel(counter) == gridDim.x - 1;
  __syncthreads();
  return is_last;
}

// Called by thread 0 of the last block once it has read every partial.
__device__ __forceinline__ void reset_ticket(unsigned int* counter) { *counter = 0u; }

// Partials written by other blocks, read from L2 (never a stale L1 line).
template <typename acc_t>
__device__ __forceinline__ acc_t load_partial(const acc_t* p) {
  return __ldcg(p);
}

// Partial reads in flight at once per thread in the last block: the loads of a batch are issued
// before the first add, so the partials cost one L2 round trip per batch instead of one per
// partial. 9 = ceil(kMaxBlocks / kThreads): the last block of the largest grid (1056 blocks of 128
// threads) reads all its partials in one batch (with 8 it took two round trips, the second for 32
// partials). The adds still run in index order, whatever the batch size.
constexpr int kPartialBatch = static_cast<int>((kMaxBlocks + kThreads - 1) / kThreads);

// Sum of partials[first + j * step] for j = 0, 1, ... while the index is < end, in that order.
// kCompensated: with Kahan's compensated summation, for partials that are many and alike (the
// free-bits split sums of one position: a running float32 sum of a thousand alike values drops
// about a thousand half-ulps, all of one sign); an infinite sum keeps no compensation (inf - inf
// would turn it into NaN).
template <bool kCompensated = false, typename acc_t>
__device__ __forceinline__ acc_t sum_partials(const acc_t* partials, int64_t first, int64_t end,
                                              int64_t step) {
  acc_t v = 0;
  [[maybe_unused]] acc_t lost = 0;  // kCompensated: what the rounding of v dropped
  for (int64_t i0 = first; i0 < end; i0 += kPartialBatch * step) {
    acc_t batch[kPartialBatch];
#pragma unroll
    for (int j = 0; j < kPartialBatch; ++j) {
      const int64_t i = i0 + j * step;
      batch[j] = i < end ? load_partial(partials + i) : acc_t(0);
    }
#pragma unroll
    for (int j = 0; j < kPartialBatch; ++j) {
      if (i0 + j * step >= end) continue;
      if constexpr (kCompensated) {
        const acc_t term = batch[j] - lost;
        const acc_t sum = v + term;
        lost = isfinite(sum) ? (sum - v) - term : acc_t(0);
        v = sum;
      } else {
        v += batch[j];
      }
    }
  }
  return v;
}

// Sum of every block's value (valid in thread 0) in block order, handed to use_total(total) in
// thread 0 of exactly one block. One block: nothing to combine. A grid launched as one
// thread-block cluster (launch_reducing_kernel, sm_90): the first block reads the others' values from
// their shared memory, and uses the total before the cluster's last barrier, so that its store
// overlaps that barrier. Otherwise the ticket: the last block to finish reads the partials. The
// same additions in the same order either way (thread t adds the values of blocks t, t +
// blockDim.x, ... in order, then block_sum; a cluster has at most 16 blocks, one per thread), so
// cluster and ticket give the same bits. Every thread of every block must call it.
template <typename acc_t, typename UseTotal>
__device__ __forceinline__ void grid_total(acc_t block_value, acc_t* partials, unsigned int slot,
                                           UseTotal&& use_total) {
  if (gridDim.x == 1) {
    if (threadIdx.x == 0) use_total(block_value);
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (__clusterSizeInBlocks() == gridDim.x) {  // one cluster: block rank == blockIdx.x
    __shared__ acc_t cluster_value;
    if (threadIdx.x == 0) cluster_value = block_value;
    // Release/acquire at cluster scope: every block's value is written and visible to the others.
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
    if (blockIdx.x == 0) {
      acc_t v = 0;
      if (threadIdx.x < gridDim.x) {
        v += *static_cast<const acc_t*>(__cluster_map_shared_rank(&cluster_value, threadIdx.x));
      }
      v = block_sum(v);
      if (threadIdx.x == 0) use_total(v);
    }
    // No block may exit (its shared memory gone) while the first block may still be reading it. No
    // ordering needed: the first block's reads are complete (used) before it arrives.
    __cluster_barrier_arrive_relaxed();
    __cluster_barrier_wait();
    return;
  }
#endif
  if (partials == nullptr) __trap();  // host bug: a multi-block grid that is neither cluster nor ticket
  unsigned int* counter = &ticket_counters[slot];
  if (threadIdx.x == 0) partials[blockIdx.x] = block_value;
  if (!take_ticket_is_last(counter)) return;
  acc_t v = sum_partials(partials, threadIdx.x, gridDim.x, blockDim.x);
  v = block_sum(v);
  if (threadIdx.x != 0) return;
  reset_ticket(counter);
  use_total(v);
}

// Reduces every thread's `value` over the grid and writes the total times `scale` to *out (one
// thread of one block). The scaling is done in double, as on the CPU: total * scale rounded once.
// Every thread of every block must call it.
template <typename acc_t>
__device__ __forceinline__ void write_grid_sum(acc_t value, acc_t* out, acc_t* partials, unsigned int slot,
                                               double scale) {
  value = block_sum(value);
  grid_total(value, partials, slot,
             [&](acc_t total) { *out = static_cast<acc_t>(static_cast<double>(total) * scale); });
}

// Threads per sample in finish_rows: the largest power of two up to a warp with batch * lanes <=
// threads (1 when the batch exceeds half the block). A function of the shape only.
__device__ __forceinline__ int finish_rows_lanes(int64_t batch, int64_t threads) {
  int lanes = 32;
  while (lanes > 1 && batch * lanes > threads) lanes >>= 1;
  return lanes;
}

// Per-sample sums of a "rows" kernel: segment s = (sample b, tile c) of `tiles` tiles per sample.
// With one tile the block that summed a sample writes it; otherwise every segment's sum goes to
// partials[s] and the last block adds each sample's tiles. It gives each sample a group of `lanes`
// threads (finish_rows_lanes): lane l adds tiles l, l + lanes, ... in order, then the group's lanes
// are added by a fixed butterfly. A small batch has many tiles (B = 1: up to kMaxBlocks, 1056),
// and one thread per sample read them in one dependent L2 round trip per kPartialBatch partials
// (118 in a row; 114 at (1, 2^20), 1024 tiles); a warp per sample reads them in at most 4. Call
// after the segment loop.
template <typename acc_t>
__device__ __forceinline__ void finish_rows(acc_t* out, acc_t* partials, int64_t batch, int64_t tiles,
                                            unsigned int slot) {
  if (tiles == 1) return;
  unsigned int* counter = &ticket_counters[slot];
  if (!take_ticket_is_last(counter)) return;
  const int lanes = finish_rows_lanes(batch, blockDim.x);
  if (lanes == 1) {  // a batch of more than half a block: a thread per sample
    for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
      out[b] = sum_partials(partials + b * tiles, 0, tiles, 1);
    }
  } else {  // batch * lanes <= blockDim.x: one pass, and every thread takes part in the shuffles
    const int64_t b = threadIdx.x / lanes;
    const int lane = static_cast<int>(threadIdx.x % lanes);
    const acc_t v = group_sum(b < batch ? sum_partials(partials + b * tiles, lane, tiles, lanes) : acc_t(0), lanes);
    if (lane == 0 && b < batch) out[b] = v;
  }
  if (threadIdx.x == 0) reset_ticket(counter);
}

// Per-sample sums of short samples (reduction "none"; the short-rows kernels): `lanes` lanes (a
// power of two up to 32) per sample, blockDim.x / lanes samples per block pass; out[b] = the
// group_sum of lane_value(b, lane) over sample b's lanes (called only for b < batch). The passes are
// block-uniform, so every lane of every warp reaches every shuffle.
template <typename acc_t, typename LaneValue>
__device__ __forceinline__ void short_rows_sums(acc_t* out, int64_t batch, int lanes, LaneValue&& lane_value) {
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int64_t per_pass = blockDim.x / lanes;
  for (int64_t b0 = blockIdx.x * per_pass; b0 < batch; b0 += gridDim.x * per_pass) {
    const int64_t b = b0 + threadIdx.x / lanes;
    const acc_t sum = group_sum(b < batch ? lane_value(b, lane) : acc_t(0), lanes);
    if (lane == 0 && b < batch) out[b] = sum;
  }
}

// Where a rows kernel puts the sum of segment s (valid in thread 0).
template <typename acc_t>
__device__ __forceinline__ void store_segment(acc_t sum, acc_t* out, acc_t* partials, int64_t s,
                                              int64_t b, int64_t tiles) {
  if (threadIdx.x != 0) return;
  if (tiles == 1) {
    out[b] = sum;
  } else {
    partials[s] = sum;
  }
}

// ---- ticket slots ---------------------------------------------------------------------------
//
// The ticket counters live in a zero-initialized __device__ array (one per translation unit, so
// each op has its own; one instance per device, zeroed when the module is loaded): no allocation,
// no memset, nothing to do at capture time. A launch that uses a ticket (grid > 1 block) gets a
// slot index as a kernel argument; the last block resets the counter, so it is 0 again for the
// next launch in that slot. Two launches that could run at the same time must not share a slot:
//  - eager launches: one slot per (device, stream), assigned on first use under a mutex. Launches
//    on one stream run one after the other, so they can share it. (Beyond kEagerSlots distinct
//    streams, streams share slots by hash: only two of them running this op at the same instant
//    could then collide.)
//  - launches captured into a CUDA graph: a fresh slot per captured launch, never handed out again,
//    since a graph may be replayed on any stream, next to eager work on its capture stream. (After
//    kTicketSlots - kEagerSlots captured launches in one process the graph slots wrap around, with
//    a warning.)
// What a collision would cost: two launches interleaving on one counter reset it while the other
// is still counting, so one of them combines partials that are not all written, and the counter
// stays off for every later launch in that slot (a wrong or unwritten sum each time). Hence fresh
// slots for captured launches, and the warning when they wrap.
inline unsigned int ticket_slot(const c10::cuda::CUDAStream& stream) {
  static std::mutex mutex;
  static std::map<std::pair<int, int64_t>, unsigned int> eager_slots;
  static unsigned int next_graph_slot = kEagerSlots;

  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  std::lock_guard<std::mutex> lock(mutex);
  if (status != cudaStreamCaptureStatusNone) {
    const unsigned int slot = next_graph_slot++;
    if (next_graph_slot == kTicketSlots) {
      next_graph_slot = kEagerSlots;
      TORCH_WARN_ONCE(
          "fastelbo: more than ", number_str(static_cast<int64_t>(kTicketSlots - kEagerSlots)),
          " launches captured into CUDA graphs; their reduction tickets are reused from now on "
          "(two graphs that share one must not run at the same time)");
    }
    return slot;
  }
  const std::pair<int, int64_t> key{static_cast<int>(stream.device_index()), stream.id()};
  const auto found = eager_slots.find(key);
  if (found != eager_slots.end()) return found->second;
  if (eager_slots.size() >= kEagerSlots) {  // out of slots: share one by hash (see above)
    return static_cast<unsigned int>((static_cast<uint64_t>(stream.id()) * 0x9E3779B97F4A7C15ull) >> 54) %
           kEagerSlots;
  }
  const unsigned int slot = static_cast<unsigned int>(eager_slots.size());
  eager_slots.emplace(key, slot);
  return slot;
}

// ---- launching a reducing kernel as one thread-block cluster ------------------------------------
//
// A grid of 2..kMaxClusterBlocks blocks runs as one cluster when the device is sm_90 or newer,
// the kernel was compiled with the cluster code (sm_90 SASS: not when an sm_80 build is JIT-run
// from PTX), the device can hold a cluster that large (queried once per kernel and device; 16
// needs the non-portable size, which H100/H200 allow), and cluster reductions are enabled
// (cuda_clusters_enabled(): FASTELBO_CUDA_CLUSTERS=0 or fastelbo._C._set_cuda_clusters(False)
// turns them off, to compare against or test the ticket path on a Hopper GPU).

// The launch of `blocks` x `threads` on `stream` as one cluster of all the blocks. `attribute`
// holds the cluster size that the returned configuration points to.
inline cudaLaunchConfig_t one_cluster_config(int64_t blocks, int64_t threads, cudaStream_t stream,
                                             cudaLaunchAttribute& attribute) {
  attribute = cudaLaunchAttribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned int>(blocks);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned int>(blocks));
  config.blockDim = dim3(static_cast<unsigned int>(threads));
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// The largest cluster (kMaxClusterBlocks, 8 or 0 blocks of kMaxClusterThreads threads) `kernel`
// can be launched with on the current device. A failed query clears its own (non-sticky) error.
inline int64_t query_cluster_capacity(const void* kernel, int device) {
  if (at::cuda::getDeviceProperties(device)->major < 9) return 0;
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  if (attributes.binaryVersion < 90 || attributes.ptxVersion < 90) return 0;
  const bool non_portable =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
  if (!non_portable) (void)cudaGetLastError();
  for (const int64_t blocks : {kMaxClusterBlocks, int64_t{8}}) {
    if (blocks > 8 && !non_portable) continue;
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config = one_cluster_config(blocks, kMaxClusterThreads, nullptr, attribute);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess) {
      if (clusters >= 1) return blocks;
    } else {
      (void)cudaGetLastError();
    }
  }
  return 0;
}

// query_cluster_capacity of kKernel on the current device `device`, cached per device (lock-free
// after the first launch). Not asked while `stream` is being captured into a CUDA graph (0, not
// cached: that launch takes the ticket), so that the query's runtime calls never meet a capture.
template <auto kKernel>
int64_t cluster_capacity(int device, cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0: not asked yet; else capacity + 1
  if (device < 0 || device >= kMaxDevices) return 0;
  int value = cached[device].load(std::memory_order_relaxed);
  if (value == 0) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    if (status != cudaStreamCaptureStatusNone) return 0;
    value = static_cast<int>(query_cluster_capacity(reinterpret_cast<const void*>(kKernel), device)) + 1;
    cached[device].store(value, std::memory_order_relaxed);
  }
  return value - 1;
}

// Whether kKernel's grid of `blocks` blocks runs as one cluster on the current device.
template <auto kKernel>
bool launch_as_cluster(int64_t blocks, cudaStream_t stream) {
  if (blocks < 2 || blocks > kMaxClusterBlocks || !cuda_clusters_enabled()) return false;
  return blocks <= cluster_capacity<kKernel>(c10::cuda::current_device(), stream);
}

// The per-block partial sums and the ticket slot of a reduction over `blocks` blocks; a 1-block
// grid or a cluster needs neither (buffer undefined, data nullptr). The buffer must outlive the
// launch only in stream order, which the caching allocator guarantees.
template <typename acc_t>
struct Partials {
  at::Tensor buffer;
  acc_t* data = nullptr;
  unsigned int slot = 0;
};

template <typename acc_t>
Partials<acc_t> reduction_partials(int64_t blocks, const at::TensorOptions& options) {
  Partials<acc_t> out;
  if (blocks > 1) {
    out.buffer = at::empty({blocks}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    out.data = out.buffer.template data_ptr<acc_t>();
    out.slot = ticket_slot(at::cuda::getCurrentCUDAStream());
  }
  return out;
}

// Launches the reducing kernel kKernel(params) on `blocks` x `threads` (on the current device, on
// `stream`). Its per-block sums are combined inside one cluster when `may_cluster` (the flat
// kernels, whose grid_total has the cluster path) and launch_as_cluster allow it; otherwise by the
// ticket, for which `partial_count` partials are allocated (1: no ticket, nothing allocated) and
// their buffer and slot handed to the kernel in params.partials and params.slot.
template <auto kKernel, typename Params>
void launch_reducing_kernel(int64_t blocks, int64_t threads, int64_t partial_count, bool may_cluster,
                            Params params, const at::TensorOptions& options, cudaStream_t stream) {
  using acc_t = std::remove_pointer_t<decltype(params.partials)>;
  const bool cluster = may_cluster && launch_as_cluster<kKernel>(blocks, stream);
  const Partials<acc_t> partials = reduction_partials<acc_t>(cluster ? 1 : partial_count, options);
  params.partials = partials.data;
  params.slot = partials.slot;
  if (!cluster) {
    launch_on_grid<kKernel>(FlatGrid{blocks, threads}, stream, params);
    return;
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = one_cluster_config(blocks, threads, stream, attribute);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kKernel, params));
}

}  // namespace cuda
}  // namespace fastelbo
