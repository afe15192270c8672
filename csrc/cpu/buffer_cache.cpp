// A small caching allocator for the large CPU outputs of the kernels (z, the gradients, the
// saved reconstruction gradient).
//
// Why: with glibc, every allocation over 32 MiB is a fresh mmap and every free an munmap, so a
// training loop that allocates a gradient the size of x_hat each step pays the kernel's page
// faults on every step, and faulting 64 MiB in (zeroing it page by page) costs more than reading
// it. Buffers freed by their tensors come back here and are handed out again, as the CUDA caching
// allocator does for device memory. The cache is bounded (FASTELBO_CPU_CACHE_MB, default 1024;
// 0 disables it) and fastelbo.empty_cpu_cache() returns its memory to the system.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/strides.h>

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <string>
#include <map>
#include <mutex>

#include "cpu_common.h"

// c10's CPU allocator flag (exported by c10, declared by no header); see ops.cpp.
extern bool FLAGS_caffe2_cpu_allocator_do_junk_fill;

namespace fastelbo {
namespace cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;  // smaller buffers: plain at::empty
constexpr size_t kHugePage = size_t{2} << 20;

// FASTELBO_CPU_CACHE_MB: a whole number of MiB >= 0 (0: no cache). Anything else is reported and
// the default used, where atoll read "1GB" as 1 and "lots" as 0 (no cache) without a word.
size_t cache_limit_bytes() {
  constexpr long long kDefaultMiB = 1024;
  const char* env = std::getenv("FASTELBO_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return static_cast<size_t>(kDefaultMiB) << 20;
  char* end = nullptr;
  errno = 0;
  const long long mib = std::strtoll(env, &end, 10);
  if (errno != 0 || end == env || *end != '\0' || mib < 0 || mib > (1LL << 30)) {
    TORCH_WARN(std::string("fastelbo: FASTELBO_CPU_CACHE_MB=") + env +
               " is not a whole number of MiB >= 0; the CPU output cache keeps the default, 1024 MiB");
    return static_cast<size_t>(kDefaultMiB) << 20;
  }
  return static_cast<size_t>(mib) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class BufferCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    // Whole huge pages: blocks of one size are interchangeable, and the kernel can back them
    // with 2 MiB pages (far fewer faults on first touch).
    const size_t size = std::max<size_t>(kHugePage, (nbytes + kHugePage - 1) / kHugePage * kHugePage);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        ptr = it->second;
        free_.erase(it);
        cached_bytes_ -= size;
      }
    }
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(kHugePage, size);
      TORCH_CHECK(ptr != nullptr, "fastelbo: out of CPU memory allocating ",
                  fastelbo::number_str(static_cast<int64_t>(size)), " bytes");
      madvise(ptr, size, MADV_HUGEPAGE);  // a hint: harmless where transparent huge pages are off
    }
    return {ptr, new Block{ptr, size}, &BufferCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& entry : free_) std::free(entry.second);
    free_.clear();
    cached_bytes_ = 0;
  }

  bool enabled() const { return limit_ > 0; }

  static BufferCache& instance() {
    // Never destroyed: tensors may still be freed during static destruction at exit.
    static auto* cache = new BufferCache();
    return *cache;
  }

 private:
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    instance().give_back(*block);
    delete block;
  }

  void give_back(const Block& block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + block.size <= limit_) {
        free_.emplace(block.size, block.ptr);
        cached_bytes_ += block.size;
        return;
      }
    }
    std::free(block.ptr);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_bytes_ = 0;
  const size_t limit_ = cache_limit_bytes();
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  BufferCache& cache = BufferCache::instance();
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  // Under the junk-fill flag (tests poisoning outputs) every output comes from c10's allocator,
  // which fills it with NaN; reused buffers would hold stale but plausible values instead.
  if (!cache.enabled() || nbytes < kMinCachedBytes || FLAGS_caffe2_cpu_allocator_do_junk_fill ||
      options.device().type() != c10::DeviceType::CPU) {
    return at::empty_strided(sizes, strides, options);
  }
  return at::detail::empty_strided_generic(sizes, strides, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(options.dtype()));
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, c10::contiguous_strides(sizes), options);
}

size_t cached_output_bytes() { return BufferCache::instance().cached_bytes(); }

void empty_output_cache() { BufferCache::instance().empty(); }

}  // namespace cpu
}  // namespace fastelbo
