// Bulk conversions between the 16-bit floating types and float for the CPU kernels.
//
// Why: at::Half and at::BFloat16 convert one element at a time in portable code (the extension is
// built for baseline x86-64, without F16C), which made the float16 recon backward 26x slower than
// float32 at (8, 65536) (2.7 ms against 0.1 ms) and bfloat16 3x slower. Here half uses the F16C
// instructions and bfloat16 AVX2 integer operations where the processor has them (runtime
// checks; compiled only on x86-64), c10's scalar conversions elsewhere.
//
// Bits: the same as static_cast for every value that is not a NaN (IEEE round to nearest even,
// subnormals and overflow included; bfloat16 with c10's rounding formula). A NaN stays a NaN,
// its payload may differ. Every element goes through the same instructions wherever it sits in
// the block (a partial vector is padded), so a value never depends on the block's alignment.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_common.h"

#if FASTELBO_X86_64
#include <immintrin.h>
#endif

namespace fastelbo {
namespace cpu {
namespace {

#if FASTELBO_X86_64

bool use_f16c() {
  static const bool available = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return available && cpu_vector_paths_enabled();
}

__attribute__((target("avx,f16c"))) void half_to_float_f16c(const at::Half* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  if (i < n) {
    alignas(16) uint16_t padded[8] = {};
    std::memcpy(padded, in + i, static_cast<size_t>(n - i) * sizeof(uint16_t));
    alignas(32) float converted[8];
    _mm256_store_ps(converted, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(padded))));
    std::memcpy(out + i, converted, static_cast<size_t>(n - i) * sizeof(float));
  }
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* in, int64_t n, at::Half* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  if (i < n) {
    alignas(32) float padded[8] = {};
    std::memcpy(padded, in + i, static_cast<size_t>(n - i) * sizeof(float));
    alignas(16) uint16_t converted[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(converted),
                    _mm256_cvtps_ph(_mm256_load_ps(padded), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    std::memcpy(out + i, converted, static_cast<size_t>(n - i) * sizeof(uint16_t));
  }
}

bool use_avx2() {
  static const bool available = __builtin_cpu_supports("avx2");
  return available && cpu_vector_paths_enabled();
}

// bfloat16 is the high half of a float: widening is exact.
__attribute__((target("avx2"))) inline __m256 bfloat16_to_float8(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// c10::BFloat16's rounding (detail::round_to_nearest_even): a NaN becomes 0x7FC0, anything else
// is rounded to nearest even on the 16 bits dropped.
__attribute__((target("avx2"))) inline __m128i float8_to_bfloat16(__m256 value) {
  const __m256i bits = _mm256_castps_si256(value);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

__attribute__((target("avx2"))) void bfloat16_to_float_avx2(const at::BFloat16* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, bfloat16_to_float8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  if (i < n) {
    alignas(16) uint16_t padded[8] = {};
    std::memcpy(padded, in + i, static_cast<size_t>(n - i) * sizeof(uint16_t));
    alignas(32) float converted[8];
    _mm256_store_ps(converted, bfloat16_to_float8(_mm_load_si128(reinterpret_cast<const __m128i*>(padded))));
    std::memcpy(out + i, converted, static_cast<size_t>(n - i) * sizeof(float));
  }
}

__attribute__((target("avx2"))) void float_to_bfloat16_avx2(const float* in, int64_t n, at::BFloat16* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), float8_to_bfloat16(_mm256_loadu_ps(in + i)));
  }
  if (i < n) {
    alignas(32) float padded[8] = {};
    std::memcpy(padded, in + i, static_cast<size_t>(n - i) * sizeof(float));
    alignas(16) uint16_t converted[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(converted), float8_to_bfloat16(_mm256_load_ps(padded)));
    std::memcpy(out + i, converted, static_cast<size_t>(n - i) * sizeof(uint16_t));
  }
}

#else  // no vector instructions here: convert() below never calls these names
constexpr bool use_f16c() { return false; }
constexpr bool use_avx2() { return false; }
constexpr std::nullptr_t half_to_float_f16c = nullptr, float_to_half_f16c = nullptr,
                         bfloat16_to_float_avx2 = nullptr, float_to_bfloat16_avx2 = nullptr;
#endif  // FASTELBO_X86_64

// std::type_identity is C++20; torch before 2.12 builds extensions with -std=c++17. It keeps the
// function pointer out of template deduction, so that the non-x86 nullptr stand-ins convert to it.
template <typename T>
struct type_identity {
  using type = T;
};

// The vectorized conversion where the processor has its instructions, else c10's per element.
template <typename From, typename To>
void convert(bool vectorized_available, typename type_identity<void (*)(const From*, int64_t, To*)>::type vectorized,
             const From* in, int64_t n, To* out) {
  if (vectorized_available) return vectorized(in, n, out);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<To>(in[i]);
}

}  // namespace

void to_float(const at::Half* in, int64_t n, float* out) { convert(use_f16c(), half_to_float_f16c, in, n, out); }
void from_float(const float* in, int64_t n, at::Half* out) { convert(use_f16c(), float_to_half_f16c, in, n, out); }
void to_float(const at::BFloat16* in, int64_t n, float* out) { convert(use_avx2(), bfloat16_to_float_avx2, in, n, out); }
void from_float(const float* in, int64_t n, at::BFloat16* out) {
  convert(use_avx2(), float_to_bfloat16_avx2, in, n, out);
}

}  // namespace cpu
}  // namespace fastelbo
