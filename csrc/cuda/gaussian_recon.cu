// CUDA kernels of the squared-error reconstruction loss 1/2 ||x_hat - x||^2, forward and backward.
//
// Forward, one launch: reads x_hat and x once in 16-byte accesses and reduces the loss in the same
// kernel (per-block partials combined in block order by the last block, or inside one
// thread-block cluster for small grids on sm_90; see cuda_common.cuh):
//   flat "sum" / "mean" / "batchmean": the tensor as one flat run of 16-byte chunks;
//   rows "none": blocks never straddle two samples, so each per-sample sum has a fixed order.
// Backward, one launch: reads x_hat and x again, and the incoming gradient on the device (no host
// sync), and writes grad_x_hat and/or grad_x. Together 5 M s bytes, the floor of DESIGN.md
// section 3.
// Below that floor (save_grad_unit, the default when x_hat requires grad; fastelbo/functional.py):
// the forward also writes scale * (x_hat - x), the gradient for an incoming gradient of 1, and the
// backward is gaussian_recon_loss_finish_grad_, whose threads read the incoming gradient and
// return at once when it is 1 (the usual loss.backward()); else they scale the buffer in place
// (float32/float64) or recompute it from x_hat and x (16-bit). Forward 3 M s plus a backward that
// reads one number, instead of 2 M s plus 3 M s.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace fastelbo {
namespace cuda {
namespace {

// Chunks per thread per iteration in the flat kernels: several independent 16-byte loads in
// flight per thread before the first use.
constexpr int kUnroll = 4;
// The same for the per-sample ("none") forward, which keeps more loop state live.
constexpr int kRowsUnroll = 2;

template <typename scalar_t>
struct ForwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x_hat;
  const scalar_t* x;
  scalar_t* grad_unit;  // save_grad_unit: scale * (x_hat - x); else nullptr
  acc_t* loss;          // (B,) for "none", else one element
  acc_t* partials;
  int64_t numel, batch, per_sample;
  double scale;
  acc_t grad_scale;  // static_cast<acc_t>(scale), as on the CPU
  bool vec;
  unsigned int slot;
  int64_t tiles_per_row, windows_per_tile;  // rows kernel
  int row_lanes;                            // short rows kernel: G lanes per sample
};

// Loss of the E elements at i0 (only the first `count` unless kFull), added to sum in element
// order; writes grad_unit when asked.
template <bool kFull, int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void recon_chunk(const ForwardParams<scalar_t>& p, int64_t i0, int count,
                                            const Packed<scalar_t, E>& x_hat,
                                            const Packed<scalar_t, E>& x, acc_t& sum) {
  acc_t g[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const acc_t xh = to_acc<acc_t>(x_hat.v[e]), xv = to_acc<acc_t>(x.v[e]);
    if (kFull || e < count) sum += math::recon_element(xh, xv);
    g[e] = math::grad_x_hat_element(xh, xv, p.grad_scale);
  }
  if (p.grad_unit != nullptr) store_pack<kFull, E>(p.grad_unit + i0, g, count);
}

// Elements [begin, end) one at a time, thread `lane` of `lanes` taking every lanes-th (coalesced
// scalar accesses): the path for pointers that are not 16-byte aligned.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void recon_scalar_range(const ForwardParams<scalar_t>& p, int64_t begin,
                                                   int64_t end, int64_t lane, int64_t lanes,
                                                   acc_t& sum) {
  for (int64_t i = begin + lane; i < end; i += lanes) {
    const acc_t xh = to_acc<acc_t>(p.x_hat[i]), xv = to_acc<acc_t>(p.x[i]);
    sum += math::recon_element(xh, xv);
    if (p.grad_unit != nullptr) {
      p.grad_unit[i] = static_cast<scalar_t>(math::grad_x_hat_element(xh, xv, p.grad_scale));
    }
  }
}

// ---- forward: flat --------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxFlatThreads<scalar_t>, kMinFlatBlocksPerSM<scalar_t>)
    recon_forward_flat_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int E = kPack<scalar_t>;
  const int64_t n = p.numel;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t sum = 0;
  if (p.vec) {
    const int64_t full_chunks = n / E;
    for (int64_t c = tid; c < full_chunks; c += kUnroll * stride) {
      Packed<scalar_t, E> x_hat[kUnroll], x[kUnroll];
      load_chunk_pairs(p.x_hat, p.x, c, stride, full_chunks, x_hat, x);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c + u * stride < full_chunks) recon_chunk<true>(p, (c + u * stride) * E, E, x_hat[u], x[u], sum);
      }
    }
    const int64_t tail = full_chunks * E;
    if (tid == 0 && tail < n) {  // the last n % E elements
      const int count = static_cast<int>(n - tail);
      recon_chunk<false>(p, tail, count, load_pack<false, E>(p.x_hat + tail, count),
                         load_pack<false, E>(p.x + tail, count), sum);
    }
  } else {
    recon_scalar_range(p, 0, n, tid, stride, sum);
  }
  write_grid_sum(sum, p.loss, p.partials, p.slot, p.scale);
}

// ---- forward: rows ("none") -----------------------------------------------------------------
// Segment s = (sample b, tile c) of C tiles per sample, tiles cut in windows of E positions
// (16 bytes); a block sums one segment at a time. Vector accesses when the sample size keeps the
// windows aligned, else element by element. Per-sample sums via store_segment / finish_rows.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<scalar_t>)
    recon_forward_rows_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int E = kPack<scalar_t>;
  const int64_t d = p.per_sample, tiles = p.tiles_per_row;
  const int64_t windows = (d + E - 1) / E;
  const int64_t segments = p.batch * tiles;
  const int64_t threads = blockDim.x;
  for (int64_t s = blockIdx.x; s < segments; s += gridDim.x) {
    const int64_t b = s / tiles, tile = s - b * tiles;
    const int64_t w_begin = tile * p.windows_per_tile;
    const int64_t w_end = min64(w_begin + p.windows_per_tile, windows);
    const int64_t row = b * d;
    acc_t sum = 0;
    if (p.vec) {  // d % E == 0: every window is a whole aligned 16-byte chunk
      for (int64_t w = w_begin + threadIdx.x; w < w_end; w += kRowsUnroll * threads) {
        Packed<scalar_t, E> x_hat[kRowsUnroll], x[kRowsUnroll];
        load_chunk_pairs(p.x_hat + row, p.x + row, w, threads, w_end, x_hat, x);
#pragma unroll
        for (int u = 0; u < kRowsUnroll; ++u) {
          if (w + u * threads < w_end) recon_chunk<true>(p, row + (w + u * threads) * E, E, x_hat[u], x[u], sum);
        }
      }
    } else {
      recon_scalar_range(p, row + w_begin * E, row + min64(w_end * E, d), threadIdx.x, threads, sum);
    }
    sum = block_sum(sum);
    store_segment(sum, p.loss, p.partials, s, b, tiles);
  }
  finish_rows(p.loss, p.partials, p.batch, tiles, p.slot);
}

// ---- forward: short rows ("none", at most kMaxShortRowWork windows or elements per sample) ------
// The rows kernel gives each sample a block of at least a warp: a sample of a few windows (or, off
// the vector path, a few elements) left most of the warp idle, and a tall batch of them ran as
// many samples one after another per block. Here a group of G lanes (a power of two >= the
// windows, or the elements, per sample) takes a sample, 128 / G samples per block pass. Each
// sample's sum has the bits the rows kernel gives it: lane l adds what thread l added there (one
// window in order, or one element), and the butterfly over the G lanes adds what the warp's
// butterfly adds (there the lanes past G add zeros, exactly).
constexpr int64_t kMaxShortRowWork = 16;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<scalar_t>)
    recon_forward_short_rows_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int E = kPack<scalar_t>;
  const int64_t d = p.per_sample;
  const int lanes = p.row_lanes;
  short_rows_sums(p.loss, p.batch, lanes, [&](int64_t b, int lane) {
    const int64_t row = b * d;
    acc_t sum = 0;
    if (p.vec) {  // d % E == 0, aligned: lane w takes window w
      const int64_t i0 = row + static_cast<int64_t>(lane) * E;
      if (static_cast<int64_t>(lane) * E < d) {
        recon_chunk<true>(p, i0, E, load_pack<true, E>(p.x_hat + i0, E), load_pack<true, E>(p.x + i0, E), sum);
      }
    } else {  // d <= lanes: lane l takes element l
      recon_scalar_range(p, row, row + d, lane, lanes, sum);
    }
    return sum;
  });
}

// ---- backward -------------------------------------------------------------------------------
template <typename scalar_t>
struct BackwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  const void* grad;  // the incoming gradient of the loss, read as grad_dtype
  AnyFloat grad_dtype;
  bool per_sample;  // "none": grad[b * grad_stride]
  int64_t grad_stride;
  const scalar_t* x_hat;
  const scalar_t* x;
  scalar_t* grad_x_hat;  // nullptr when not needed
  scalar_t* grad_x;      // nullptr when not needed
  acc_t scale;
  int64_t numel, per_sample_size;
  bool vec;
  // gaussian_recon_loss_finish_grad_: grad_x_hat already holds the gradient for an incoming
  // gradient of 1 (the forward wrote it); when the incoming gradient is 1 there is nothing to do.
  bool unit_grad_written;
};

// The per-sample incoming gradient times the scale, for elements walking through the samples.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_grad(const BackwardParams<scalar_t>& p, int64_t row) {
  return load_any<acc_t>(p.grad, p.grad_dtype, row * p.grad_stride) * p.scale;
}

// Gradients of the E elements at i0 (only the first `count` unless kFull); pos is the (sample,
// position) of i0 when per_sample.
template <bool kFull, int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void backward_chunk(const BackwardParams<scalar_t>& p, int64_t i0, int count,
                                               const Packed<scalar_t, E>& x_hat,
                                               const Packed<scalar_t, E>& x, acc_t grad_all,
                                               RowPos pos) {
  acc_t grad[E];
  if (!p.per_sample) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      grad[e] = math::grad_x_hat_element(to_acc<acc_t>(x_hat.v[e]), to_acc<acc_t>(x.v[e]), grad_all);
    }
  } else {
    int64_t cached_row = pos.row;
    acc_t grad_rec = row_grad<scalar_t, acc_t>(p, pos.row);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if ((kFull || e < count) && pos.row != cached_row) {  // crossed into the next sample
        cached_row = pos.row;
        grad_rec = row_grad<scalar_t, acc_t>(p, pos.row);
      }
      grad[e] = math::grad_x_hat_element(to_acc<acc_t>(x_hat.v[e]), to_acc<acc_t>(x.v[e]), grad_rec);
      pos.next(p.per_sample_size);
    }
  }
  if (p.grad_x_hat != nullptr) store_pack<kFull, E>(p.grad_x_hat + i0, grad, count);
  if (p.grad_x != nullptr) {
#pragma unroll
    for (int e = 0; e < E; ++e) grad[e] = -grad[e];
    store_pack<kFull, E>(p.grad_x + i0, grad, count);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kLargeBlockThreads, kLargeBlocksPerSM<scalar_t>)
    recon_backward_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int E = kPack<scalar_t>;
  const int64_t n = p.numel, d = p.per_sample_size;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // The usual loss.backward() after a forward that wrote the gradient: every thread reads the
  // one incoming gradient and the whole grid returns, no pass over memory. (The forward wrote
  // math::grad_x_hat_element(x_hat, x, scale), which is what this kernel writes for 1 * scale.)
  if (p.unit_grad_written && load_any<acc_t>(p.grad, p.grad_dtype, 0) == acc_t(1)) return;
  const acc_t grad_all = p.per_sample ? acc_t(0) : load_any<acc_t>(p.grad, p.grad_dtype, 0) * p.scale;
  if (p.vec) {
    const int64_t full_chunks = n / E;
    if (!p.per_sample) {
      for (int64_t c = tid; c < full_chunks; c += kUnroll * stride) {
        Packed<scalar_t, E> x_hat[kUnroll], x[kUnroll];
        load_chunk_pairs(p.x_hat, p.x, c, stride, full_chunks, x_hat, x);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (c + u * stride < full_chunks) {
            backward_chunk<true>(p, (c + u * stride) * E, E, x_hat[u], x[u], grad_all, RowPos{0, 0});
          }
        }
      }
    } else if (tid < full_chunks) {
      // "none": the (sample, position) of the thread's chunk, advanced by the grid stride
      // without divisions; one chunk per iteration (not a speed target).
      RowPos pos = row_pos(tid * E, d);
      const int64_t step_rows = stride * E / d, step_cols = stride * E - step_rows * d;
      for (int64_t c = tid; c < full_chunks; c += stride) {
        backward_chunk<true>(p, c * E, E, load_pack<true, E>(p.x_hat + c * E, E),
                             load_pack<true, E>(p.x + c * E, E), grad_all, pos);
        pos.advance(step_rows, step_cols, d);
      }
    }
    const int64_t tail = full_chunks * E;
    if (tid == 0 && tail < n) {  // the last n % E elements
      const int count = static_cast<int>(n - tail);
      backward_chunk<false>(p, tail, count, load_pack<false, E>(p.x_hat + tail, count),
                            load_pack<false, E>(p.x + tail, count), grad_all,
                            p.per_sample ? row_pos(tail, d) : RowPos{0, 0});
    }
  } else {  // unaligned pointers: element by element
    RowPos pos{0, 0};
    int64_t step_rows = 0, step_cols = 0;
    if (p.per_sample && tid < n) {
      pos = row_pos(tid, d);
      step_rows = stride / d;
      step_cols = stride - step_rows * d;
    }
    for (int64_t i = tid; i < n; i += stride) {
      const acc_t grad_rec = p.per_sample ? row_grad<scalar_t, acc_t>(p, pos.row) : grad_all;
      const acc_t grad = math::grad_x_hat_element(to_acc<acc_t>(p.x_hat[i]), to_acc<acc_t>(p.x[i]), grad_rec);
      if (p.grad_x_hat != nullptr) p.grad_x_hat[i] = static_cast<scalar_t>(grad);
      if (p.grad_x != nullptr) p.grad_x[i] = static_cast<scalar_t>(-grad);
      if (p.per_sample) pos.advance(step_rows, step_cols, d);
    }
  }
}

// ---- finish_grad_: the prepared gradient times the incoming gradient ---------------------------
// For float32/float64 buffers (gaussian_recon_loss_finish_grad_): the buffer holds
// scale * (x_hat - x) from the forward; for an incoming gradient g it becomes g times that, in
// place: one read and one write of the buffer instead of reading x_hat and x again. 16-bit
// buffers are recomputed from x_hat and x instead (recon_backward_kernel): scaling a rounded
// 16-bit value would round twice, and in float16 the unscaled values may have lost their low bits
// among the subnormals that a loss scale (torch.amp.GradScaler) is there to avoid.
template <typename scalar_t>
struct ScaleParams {
  const void* grad;  // the incoming gradient of the reduced loss, one element
  AnyFloat grad_dtype;
  scalar_t* data;    // the prepared gradient, scaled in place
  int64_t numel;
  bool vec;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kLargeBlockThreads, kLargeBlocksPerSM<scalar_t>)
    recon_scale_grad_kernel(const ScaleParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int E = kPack<scalar_t>;
  const acc_t g = load_any<acc_t>(p.grad, p.grad_dtype, 0);
  if (g == acc_t(1)) return;  // the usual loss.backward(): the buffer is the gradient already
  const int64_t n = p.numel;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p.vec) {
    const int64_t full_chunks = n / E;
    for (int64_t c = tid; c < full_chunks; c += kUnroll * stride) {
      Packed<scalar_t, E> chunk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // every load in flight before the first store
        if (c + u * stride < full_chunks) chunk[u] = load_pack<true, E>(p.data + (c + u * stride) * E, E);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c + u * stride >= full_chunks) continue;
        acc_t out[E];
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = g * to_acc<acc_t>(chunk[u].v[e]);
        store_pack<true, E>(p.data + (c + u * stride) * E, out, E);
      }
    }
    const int64_t tail = full_chunks * E;
    if (tid == 0 && tail < n) {  // the last n % E elements
      const int count = static_cast<int>(n - tail);
      const Packed<scalar_t, E> chunk = load_pack<false, E>(p.data + tail, count);
      acc_t out[E];
#pragma unroll
      for (int e = 0; e < E; ++e) out[e] = g * to_acc<acc_t>(chunk.v[e]);
      store_pack<false, E>(p.data + tail, out, count);
    }
  } else {
    for (int64_t i = tid; i < n; i += stride) p.data[i] = static_cast<scalar_t>(g * to_acc<acc_t>(p.data[i]));
  }
}

// ---- host -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> gaussian_recon_loss_cuda(const at::Tensor& x_hat,
                                                            const at::Tensor& x, int64_t reduction,
                                                            bool save_grad_unit) {
  check_gaussian_recon_loss(x_hat, x, reduction);
  const c10::cuda::CUDAGuard device_guard(x_hat.device());
  at::Tensor loss = allocate_recon_loss(x_hat, reduction);
  const ReconOperands rows = recon_operands(x_hat, x);
  at::Tensor grad_unit = save_grad_unit ? at::empty_strided(x_hat.sizes(), rows.x_hat.strides(), x_hat.options())
                                        : at::empty({0}, x_hat.options());
  const BatchLayout layout = batch_layout(x_hat);
  if (layout.numel == 0) {  // empty: the reduction's identity, no kernel
    loss.zero_();
    return {loss, grad_unit};
  }
  const double scale = reduction_scale(reduction, layout);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_hat.scalar_type(), "gaussian_recon_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int E = kPack<scalar_t>;
    ForwardParams<scalar_t> p{};
    p.x_hat = rows.x_hat.const_data_ptr<scalar_t>();
    p.x = rows.x.const_data_ptr<scalar_t>();
    p.grad_unit = save_grad_unit ? grad_unit.data_ptr<scalar_t>() : nullptr;
    p.loss = loss.data_ptr<acc_t>();
    p.numel = layout.numel;
    p.batch = layout.batch;
    p.per_sample = layout.per_sample;
    p.scale = scale;
    p.grad_scale = static_cast<acc_t>(scale);
    const bool aligned = all_aligned({p.x_hat, p.x, p.grad_unit}, 16);
    const int64_t d = layout.per_sample;
    const bool rows_vec = aligned && d % E == 0;
    const int64_t row_work = rows_vec ? d / E : d;  // the threads of a sample in the rows kernel
    if (reduction == kNone && row_work <= kMaxShortRowWork && cuda_spread_enabled()) {
      int lanes = 1;
      while (lanes < row_work) lanes *= 2;
      p.row_lanes = lanes;
      p.vec = rows_vec;
      const int64_t blocks = std::min<int64_t>(ceil_div(layout.batch, kThreads / lanes), kMaxBlocks);
      launch_on_grid<recon_forward_short_rows_kernel<scalar_t>>(FlatGrid{blocks, kThreads}, stream, p);
    } else if (reduction == kNone) {
      const RowsGrid grid = rows_grid(layout.batch, ceil_div(d, E), kRowsUnroll);
      p.windows_per_tile = grid.windows_per_tile;
      p.tiles_per_row = grid.tiles;
      p.vec = rows_vec;
      launch_reducing_kernel<recon_forward_rows_kernel<scalar_t>>(
          grid.blocks, grid.threads, grid.tiles > 1 ? grid.blocks : 1 /* 1 tile: no ticket */, false, p,
          x_hat.options(), stream);
    } else {
      p.vec = aligned;
      const FlatGrid grid = flat_reduction_grid<scalar_t>(ceil_div(layout.numel, E), kUnroll);
      launch_reducing_kernel<recon_forward_flat_kernel<scalar_t>>(grid.blocks, grid.threads, grid.blocks, true, p,
                                                                  x_hat.options(), stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad_unit};
}

// One launch of recon_backward_kernel writing the gradients for grad_loss into grad_x_hat and grad_x
// (either undefined when not needed), laid out like rows.x_hat.
void launch_recon_backward(const at::Tensor& grad_loss, const ReconOperands& rows, int64_t reduction,
                           const at::Tensor& grad_x_hat, const at::Tensor& grad_x, bool unit_grad_written) {
  const BatchLayout layout = batch_layout(rows.x_hat);
  if (layout.numel == 0 || !(grad_x_hat.defined() || grad_x.defined())) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.x_hat.scalar_type(), "gaussian_recon_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int E = kPack<scalar_t>;
    BackwardParams<scalar_t> p{};
    p.grad = grad_loss.const_data_ptr();
    p.grad_dtype = any_float_code(grad_loss.scalar_type());
    p.per_sample = reduction == kNone;
    p.grad_stride = p.per_sample ? grad_loss.stride(0) : 0;
    p.x_hat = rows.x_hat.const_data_ptr<scalar_t>();
    p.x = rows.x.const_data_ptr<scalar_t>();
    p.grad_x_hat = grad_x_hat.defined() ? grad_x_hat.data_ptr<scalar_t>() : nullptr;
    p.grad_x = grad_x.defined() ? grad_x.data_ptr<scalar_t>() : nullptr;
    p.scale = static_cast<acc_t>(reduction_scale(reduction, layout));
    p.numel = layout.numel;
    p.per_sample_size = layout.per_sample;
    p.vec = all_aligned({p.x_hat, p.x, p.grad_x_hat, p.grad_x}, 16);
    p.unit_grad_written = unit_grad_written;
    launch_on_grid<recon_backward_kernel<scalar_t>>(large_block_grid(ceil_div(layout.numel, E)), stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> gaussian_recon_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction,
    bool need_grad_x_hat, bool need_grad_x) {
  check_gaussian_recon_loss_backward(grad_loss, x_hat, x, reduction);
  const c10::cuda::CUDAGuard device_guard(x_hat.device());
  const ReconOperands rows = recon_operands(x_hat, x);
  auto allocate_grad = [&](bool needed) {
    return needed ? at::empty_strided(x_hat.sizes(), rows.x_hat.strides(), x_hat.options())
                  : at::empty({0}, x_hat.options());
  };
  at::Tensor grad_x_hat = allocate_grad(need_grad_x_hat), grad_x = allocate_grad(need_grad_x);
  launch_recon_backward(grad_loss, rows, reduction, need_grad_x_hat ? grad_x_hat : at::Tensor(),
                        need_grad_x ? grad_x : at::Tensor(), false);
  return {grad_x_hat, grad_x};
}

// grad_unit holds the gradient for an incoming gradient of 1; make it the one for grad_loss. The
// kernel decides on the device, so the host never waits for grad_loss.
void gaussian_recon_loss_finish_grad_cuda(const at::Tensor& grad_unit, const at::Tensor& grad_loss,
                                          const at::Tensor& x_hat, const at::Tensor& x, int64_t reduction) {
  check_gaussian_recon_loss_finish_grad(grad_unit, grad_loss, x_hat, x, reduction);
  const c10::cuda::CUDAGuard device_guard(x_hat.device());
  if (!scales_prepared_grad(grad_unit.scalar_type())) {  // (x copied into x_hat's layout if need be)
    launch_recon_backward(grad_loss, recon_operands(x_hat, x), reduction, grad_unit, at::Tensor(), true);
    return;
  }
  if (grad_unit.numel() == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad_unit.scalar_type(), "gaussian_recon_loss_finish_grad_cuda", [&] {
    ScaleParams<scalar_t> p{};
    p.grad = grad_loss.const_data_ptr();
    p.grad_dtype = any_float_code(grad_loss.scalar_type());
    p.data = grad_unit.data_ptr<scalar_t>();
    p.numel = grad_unit.numel();
    p.vec = all_aligned({p.data}, 16);
    launch_on_grid<recon_scale_grad_kernel<scalar_t>>(large_block_grid(ceil_div(p.numel, kPack<scalar_t>)), stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

int64_t recon_forward_cluster_capacity(int device) {
  const c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device));
  return cluster_capacity<recon_forward_flat_kernel<float>>(device, at::cuda::getCurrentCUDAStream());
}

}  // namespace cuda
}  // namespace fastelbo

TORCH_LIBRARY_IMPL(fastelbo, CUDA, m) {
  m.impl("gaussian_recon_loss", &fastelbo::cuda::gaussian_recon_loss_cuda);
  m.impl("gaussian_recon_loss_backward", &fastelbo::cuda::gaussian_recon_loss_backward_cuda);
  m.impl("gaussian_recon_loss_finish_grad_", &fastelbo::cuda::gaussian_recon_loss_finish_grad_cuda);
}
