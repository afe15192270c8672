// Work partition and deterministic reductions shared by the CPU kernels.
//
// Every (batch, per_sample) tensor is cut into tasks of at most kChunk consecutive elements that
// never straddle two samples. The cut depends only on the shape, never on the thread count, and
// each task's partial sum is computed in element order; the partials are then combined in task
// order. Results are therefore bit-identical for any number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../fastelbo.h"

namespace fastelbo {
namespace cpu {

// A contiguous CPU tensor for a kernel output. Large ones (>= 1 MiB) come from a bounded cache of
// reused buffers (buffer_cache.cpp), so a training loop does not fault fresh memory in each step.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
// The same with the given strides (dense: the gradients in the layout of recon_operands).
at::Tensor empty_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options);
size_t cached_output_bytes();  // bytes held by the cache, not in use
void empty_output_cache();     // returns the cached buffers to the system

// The AVX2 and F16C paths below exist only on x86-64 (written for GCC and Clang: target
// attributes, __builtin_cpu_supports), chosen at run time by what the processor has. Elsewhere
// (aarch64: AWS Graviton, NVIDIA Grace in a GH200) only the portable scalar code is compiled:
// the same formulas, possibly different last bits than the vector path.
#if defined(__x86_64__)
#define FASTELBO_X86_64 1
#else
#define FASTELBO_X86_64 0
#endif

// Whether the kernels may take those vector paths where the processor has them (the default).
// Off, every block runs the portable scalar code that processors without AVX2 / F16C and other
// architectures run, so that the tests check that code on x86-64 too. The two paths can differ
// in the last bit of std and eps (different exp, log, sincos). Not to be switched while an op
// runs. set_cpu_vector_paths_enabled returns the previous setting.
bool cpu_vector_paths_enabled();
bool set_cpu_vector_paths_enabled(bool enabled);

// Vectorized helpers (vector_math.cpp: AVX2 where available, else elbo_math.h's scalar functions).
// std[i] = exp(logvar[i] / 2) for i < n.
void posterior_std_block(const float* logvar, int64_t n, float* std);
void posterior_std_block(const double* logvar, int64_t n, double* std);
// Writes the 4 * count standard normals of Philox groups first_group .. first_group + count - 1 of
// one draw stream.
void fill_normal_groups(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, float* out);
void fill_normal_groups(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, double* out);

// Bulk conversions between the 16-bit floating types and float (convert.cpp): F16C for half where
// the processor has it, vectorized integer loops for bfloat16. The same bits as static_cast for
// every non-NaN value, whatever the element's position in the block.
void to_float(const at::Half* in, int64_t n, float* out);
void to_float(const at::BFloat16* in, int64_t n, float* out);
void from_float(const float* in, int64_t n, at::Half* out);
void from_float(const float* in, int64_t n, at::BFloat16* out);

template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// n elements converted from one supported dtype to another: in bulk between a 16-bit type and
// float (to_float / from_float), element by element otherwise.
template <typename From, typename To>
inline void convert_block(const From* in, int64_t n, To* out) {
  if constexpr (kIs16Bit<From>) {
    to_float(in, n, out);
  } else if constexpr (kIs16Bit<To>) {
    from_float(in, n, out);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<To>(in[i]);
  }
}

// How the kernels stage data whose dtype is not acc_t (16-bit types, computed in float) a block at
// a time, and touch acc_t data in place:
//   as_acc(in, n, buffer)   the n input values as acc_t: `in` itself, or converted into `buffer`;
//   acc_out(out, buffer)    where to compute results bound for `out`: `out` itself, or `buffer`;
//   store_acc(res, n, out)  then moves n results computed there into `out` (nothing in place).
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* in, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return in;
  } else {
    convert_block(in, n, buffer);
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
inline acc_t* acc_out(scalar_t* out, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return out;
  } else {
    return buffer;
  }
}

template <typename acc_t, typename scalar_t>
inline void store_acc(const acc_t* results, int64_t n, scalar_t* out) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) convert_block(results, n, out);
}

// The normals of one draw stream, read by ascending index below `end`: generated kGroups Philox
// groups at a time (vectorized) and looked up by index.
template <typename acc_t>
class NormalBlock {
 public:
  NormalBlock(uint64_t seed, uint64_t stream, int64_t end)
      : seed_(seed), stream_(stream), end_group_(static_cast<uint64_t>(end + 3) / 4) {}

  acc_t operator()(int64_t index) {
    const uint64_t group = static_cast<uint64_t>(index) >> 2;
    if (group < first_ || group >= first_ + count_) {
      first_ = group;
      count_ = std::min<uint64_t>(kGroups, end_group_ - group);
      fill_normal_groups(seed_, stream_, first_, static_cast<int64_t>(count_), values_);
    }
    return values_[(group - first_) * 4 + (index & 3)];
  }

  // The normals of indices [first, first + n) into out, in bulk: the per-element loops that use
  // them then hold no call and vectorize.
  void take(int64_t first, int64_t n, acc_t* out) {
    for (int64_t i = first, end = first + n; i < end;) {
      (*this)(i);  // buffers the groups from i's on
      const int64_t buffered_end = std::min<int64_t>(end, static_cast<int64_t>(4 * (first_ + count_)));
      const acc_t* src = values_ + (i - static_cast<int64_t>(4 * first_));
      std::copy(src, src + (buffered_end - i), out + (i - first));
      i = buffered_end;
    }
  }

 private:
  static constexpr uint64_t kGroups = 16;
  uint64_t seed_, stream_, end_group_;
  uint64_t first_ = 0, count_ = 0;
  acc_t values_[4 * kGroups];
};

// eps of elements [first, first + n) of one draw into out: the caller's eps for that draw
// (`given`, converted) when there is one, else the draw's normals.
template <typename scalar_t, typename acc_t>
void take_eps(const scalar_t* given, NormalBlock<acc_t>& normal, int64_t first, int64_t n, acc_t* out) {
  if (given) {
    convert_block(given + first, n, out);
  } else {
    normal.take(first, n, out);
  }
}

// Elements per sub-block of the sample+KL loops: logvar is converted and exponentiated a sub-block
// at a time (vectorized), then the rest runs element by element.
constexpr int64_t kSubBlock = 64;

// 16K elements: large enough to amortize a task's set-up, small enough to keep both cores busy
// on a latent of a few samples. Multiple of 4 so tasks start on Philox group boundaries in rows
// whose length is a multiple of 4.
constexpr int64_t kChunk = 16384;
// Below this many elements a single thread is faster than waking the pool (host overhead
// dominates the small sizes that VAEs on MNIST-like data use).
constexpr int64_t kMinElementsPerThread = 32768;

// Cascade summation, as torch.sum does on the CPU: values are summed in groups of kFanIn, group
// sums in groups of kFanIn, and so on, so the rounding error grows like kFanIn * log(n) instead of
// n. The order is fixed by the sequence of add() calls, so the result is deterministic.
constexpr int kCascadeFanIn = 16;
constexpr int kCascadeLevels = 6;  // 16^5 values before the top level grows sequentially

template <typename acc_t>
class CascadeSum {
 public:
  void add(acc_t value) {
    level_[0] += value;
    for (int l = 0; l + 1 < kCascadeLevels && ++count_[l] == kCascadeFanIn; ++l) {
      level_[l + 1] += level_[l];
      level_[l] = 0;
      count_[l] = 0;
    }
  }
  acc_t sum() const {
    acc_t total = 0;
    for (int l = kCascadeLevels - 1; l >= 0; --l) total += level_[l];
    return total;
  }

 private:
  acc_t level_[kCascadeLevels] = {};
  int count_[kCascadeLevels] = {};
};

// Per-sample sums of a run of values that holds whole samples of D values each, handed over in
// pieces of any length (a sample may straddle two): each sample's values are added in order,
// starting from 0, and the sums written to out[0], out[1], ... For short samples (reduction "none"
// with a few elements per sample), where cutting the work at every sample cost more than the
// sample itself.
template <typename acc_t>
class SampleSums {
 public:
  SampleSums(int64_t D, acc_t* out) : D_(D), out_(out) {}
  void add(const acc_t* values, int64_t n) {
    int64_t j = 0;
    for (; filled_ != 0 && j < n; ++j) {  // the sample begun in an earlier piece
      sum_ += values[j];
      if (++filled_ == D_) {
        *out_++ = sum_;
        sum_ = 0;
        filled_ = 0;
      }
    }
    for (; j + D_ <= n; j += D_) {  // whole samples
      acc_t sum = 0;
      for (int64_t k = 0; k < D_; ++k) sum += values[j + k];
      *out_++ = sum;
    }
    for (; j < n; ++j, ++filled_) sum_ += values[j];  // a sample that goes on in the next piece
  }

 private:
  int64_t D_;
  acc_t* out_;
  acc_t sum_ = 0;
  int64_t filled_ = 0;
};

// CascadeSum of n columns at once, over rows added one after another: the per-position batch
// sums of free bits, where a plain running sum over a large batch lost digits (B = 2^24 rows of
// 0.1: 15% off in float32). Each row's values go into row() (row()[j] += value for column j; any
// grouping of the row's columns), then end_row(); the carries run over all columns together, in
// loops that vectorize.
template <typename acc_t>
class ColumnCascadeSum {
 public:
  explicit ColumnCascadeSum(int64_t n) : n_(n), levels_(static_cast<size_t>(kCascadeLevels * n), acc_t(0)) {}
  acc_t* row() { return levels_.data(); }
  void end_row() {
    for (int l = 0; l + 1 < kCascadeLevels && ++count_[l] == kCascadeFanIn; ++l) {
      acc_t* low = levels_.data() + l * n_;
      acc_t* high = low + n_;
      for (int64_t j = 0; j < n_; ++j) high[j] += low[j];
      std::fill(low, low + n_, acc_t(0));
      count_[l] = 0;
    }
  }
  acc_t sum(int64_t j) const {  // as CascadeSum::sum: the top level first
    acc_t total = 0;
    for (int l = kCascadeLevels - 1; l >= 0; --l) total += levels_[l * n_ + j];
    return total;
  }

 private:
  int64_t n_;
  std::vector<acc_t> levels_;
  int count_[kCascadeLevels] = {};
};

// The layout a kernel cuts its work by. Per sample when the kernel needs per-sample results or
// positions (reduction "none"); otherwise the tensor is one run of numel elements, so
// that a small sample (a 20-wide latent) is not a task of its own: a task's set-up (its block of
// Philox normals, its partial sums) costs more than 20 elements do. Depends on the shape and
// reduction only: the summation order stays fixed.
inline BatchLayout task_layout(const BatchLayout& layout, bool per_sample) {
  if (per_sample) return layout;
  BatchLayout flat;
  flat.batch = 1;
  flat.per_sample = layout.numel;
  flat.numel = layout.numel;
  return flat;
}

// The fixed cut of a (batch, per_sample) tensor into pieces and tasks. A piece is a run of at most
// kChunk consecutive elements of one sample (a sample longer than kChunk has several), with its
// own partial sum. A task is a run of consecutive pieces for one thread: a single piece when the
// samples are longer than kChunk, else as many whole samples as fit in kChunk elements, so that
// short samples (a 20-wide latent with reduction "none") share one task's set-up. The cut depends
// only on the shape: the summation order is fixed.
class RowChunking {
 public:
  explicit RowChunking(const BatchLayout& layout)
      : per_sample_(layout.per_sample),
        chunks_per_row_(std::max<int64_t>(1, (layout.per_sample + kChunk - 1) / kChunk)),
        pieces_per_task_(chunks_per_row_ > 1 ? 1 : std::max<int64_t>(1, kChunk / std::max<int64_t>(1, per_sample_))),
        num_pieces_(layout.numel == 0 ? 0 : layout.batch * chunks_per_row_),
        num_tasks_((num_pieces_ + pieces_per_task_ - 1) / pieces_per_task_) {}

  int64_t num_tasks() const { return num_tasks_; }
  int64_t num_pieces() const { return num_pieces_; }
  int64_t chunks_per_row() const { return chunks_per_row_; }
  int64_t per_sample() const { return per_sample_; }

  // Pieces [first_piece(task), end_piece(task)) of a task.
  int64_t first_piece(int64_t task) const { return task * pieces_per_task_; }
  int64_t end_piece(int64_t task) const { return std::min(num_pieces_, (task + 1) * pieces_per_task_); }
  // The sample of a piece, and the piece's global element range [piece_begin, piece_end).
  int64_t row_of_piece(int64_t piece) const { return piece / chunks_per_row_; }
  int64_t piece_begin(int64_t piece) const {
    return row_of_piece(piece) * per_sample_ + (piece % chunks_per_row_) * kChunk;
  }
  int64_t piece_end(int64_t piece) const {
    return row_of_piece(piece) * per_sample_ + std::min(per_sample_, (piece % chunks_per_row_ + 1) * kChunk);
  }
  // A task's global element range [begin, end).
  int64_t begin(int64_t task) const { return piece_begin(first_piece(task)); }
  int64_t end(int64_t task) const { return piece_end(end_piece(task) - 1); }

  // Runs body(task) for every task, in parallel when the tensor is large enough.
  template <typename Body>
  void for_each_task(Body&& body) const {
    if (num_tasks_ == 0) return;
    const int64_t elements_per_task = std::max<int64_t>(1, std::min(per_sample_, kChunk) * pieces_per_task_);
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / elements_per_task);
    at::parallel_for(0, num_tasks_, grain, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) body(task);
    });
  }

 private:
  int64_t per_sample_;
  int64_t chunks_per_row_;
  int64_t pieces_per_task_;
  int64_t num_pieces_;
  int64_t num_tasks_;
};

// Computes the partial sum of every piece, task by task (task_sums(task, sums) writes the sums of
// the task's pieces, in order, at sums[0], sums[1], ...), then writes the reduced loss into `out`:
// per-sample sums for reduction "none", else scale * total. `layout` is the one `chunking` was cut
// by (task_layout). Fixed combination order.
template <typename acc_t, typename TaskSums>
void reduce_rows_into(const RowChunking& chunking, const BatchLayout& layout, int64_t reduction,
                      double scale, at::Tensor& out, TaskSums&& task_sums) {
  std::vector<acc_t> partials(chunking.num_pieces());
  chunking.for_each_task([&](int64_t task) { task_sums(task, partials.data() + chunking.first_piece(task)); });

  // Cascaded over the pieces of a row and over the rows: a whole-tensor reduction is one row of
  // numel / kChunk pieces (4096 at 2^26 elements), which a running sum added with an error 36
  // times torch.sum's.
  // A row of one piece (reduction "none" over short samples: millions of rows) skips the
  // CascadeSum's set-up: 0 + value is what a CascadeSum of one value gives.
  acc_t* out_data = out.data_ptr<acc_t>();
  CascadeSum<acc_t> total;
  for (int64_t b = 0; b < layout.batch; ++b) {
    acc_t row_sum = 0;
    if (chunking.num_pieces() > 0 && chunking.chunks_per_row() == 1) {
      row_sum += partials[b];
    } else if (chunking.num_pieces() > 0) {
      CascadeSum<acc_t> pieces;
      for (int64_t c = 0; c < chunking.chunks_per_row(); ++c) pieces.add(partials[b * chunking.chunks_per_row() + c]);
      row_sum = pieces.sum();
    }
    if (reduction == kNone) {
      out_data[b] = row_sum;
    } else {
      total.add(row_sum);
    }
  }
  // Scale in double: total / B rounded once, not total * round(1 / B).
  if (reduction != kNone) out_data[0] = static_cast<acc_t>(static_cast<double>(total.sum()) * scale);
}

}  // namespace cpu
}  // namespace fastelbo
