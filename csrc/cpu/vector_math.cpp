// The transcendental-heavy parts of the sample+KL kernels, vectorized with AVX2 where the
// processor has it: the standard normals of consecutive Philox groups, and std = exp(logvar / 2).
//
// Why: the scalar Box-Muller (log, sqrt, sincos per pair) costs about 19 ns per normal here and
// expf about 7 ns, more than everything else the kernels do per element, and eager PyTorch's
// randn and exp are vectorized. The AVX2 path computes the same formula (DESIGN.md section 5: the counter layout
// and the transform of csrc/elbo_math.h) with SLEEF's 1-ulp vector log and sincos, which
// libtorch_cpu ships; the result can differ from the scalar path in the last bit. The symbols
// are declared weak, so a torch without them falls back to the scalar path instead of failing
// to load. Only on x86-64: elsewhere the scalar path is all there is.
#include <atomic>
#include <cstdint>

#include "../elbo_math.h"
#include "cpu_common.h"

#if FASTELBO_X86_64
#include <immintrin.h>

namespace {

struct SleefFloat8Pair {
  __m256 x;  // sin
  __m256 y;  // cos
};

}  // namespace

extern "C" {
__attribute__((weak, target("avx2,fma"))) __m256 Sleef_logf8_u10avx2(__m256);
__attribute__((weak, target("avx2,fma"))) SleefFloat8Pair Sleef_sincosf8_u10avx2(__m256);
__attribute__((weak, target("avx2,fma"))) __m256 Sleef_expf8_u10avx2(__m256);
}
#endif  // FASTELBO_X86_64

namespace fastelbo {
namespace cpu {
namespace {

std::atomic<bool> vector_paths_enabled{true};  // cpu_vector_paths_enabled(), below

template <typename acc_t>
void fill_scalar(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, acc_t* out) {
  for (int64_t g = 0; g < count; ++g) {
    const math::Normal4<acc_t> n = math::normal_group<acc_t>(seed, stream, first_group + g);
    for (int l = 0; l < 4; ++l) out[4 * g + l] = n.v[l];
  }
}

#if FASTELBO_X86_64
bool use_avx2() {
  static const bool available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                &Sleef_logf8_u10avx2 != nullptr &&
                                &Sleef_sincosf8_u10avx2 != nullptr && &Sleef_expf8_u10avx2 != nullptr;
  return available && cpu_vector_paths_enabled();
}

// Exactly uniform_open01<float>: the uint32 rounded once to float (as the sum of its exactly
// representable high and low halves), times 2^-32 (exact), plus 2^-33.
__attribute__((target("avx2,fma"))) inline __m256 uniform_open01_avx2(__m256i bits) {
  const __m256 high = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 16)), _mm256_set1_ps(65536.0f));
  const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(bits, _mm256_set1_epi32(0xFFFF)));
  const __m256 value = _mm256_add_ps(high, low);
  return _mm256_add_ps(_mm256_mul_ps(value, _mm256_set1_ps(2.3283064365386963e-10f)),
                       _mm256_set1_ps(1.1641532182693481e-10f));
}

// The high and low 32 bits of m * a for 8 lanes of 32 bits (Philox's mulhilo): vpmuludq
// multiplies the even lanes, a second one the odd lanes shifted down, and blends put the halves
// back in lane order.
__attribute__((target("avx2,fma"))) inline void mulhilo8(__m256i a, uint32_t m, __m256i& hi, __m256i& lo) {
  const __m256i factor = _mm256_set1_epi64x(m);
  const __m256i even = _mm256_mul_epu32(a, factor);                        // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), factor);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Eight groups (32 normals) per iteration: Philox4x32-10 of the 8 groups in the 8 lanes of four
// vectors (word w of group g + j in lane j of v[w]; math::philox4x32_10 one lane at a time), then
// the 16 Box-Muller pairs 8 at a time. Integer-exact Philox; the transform is the formula of
// math::box_muller4 with SLEEF's vector log and sincos. A last partial iteration computes all 8
// groups into a scratch buffer and copies what was asked for.
__attribute__((target("avx2,fma"))) void fill_avx2(uint64_t seed, uint64_t stream,
                                                    uint64_t first_group, int64_t count, float* out) {
  const __m256i stream_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream)));
  const __m256i stream_hi =
      _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream >> 32) ^ math::kStreamTag));
  for (int64_t g = 0; g < count; g += 8) {
    alignas(32) uint32_t group_lo[8], group_hi[8];
    for (int j = 0; j < 8; ++j) {
      const uint64_t group = first_group + static_cast<uint64_t>(g + j);
      group_lo[j] = static_cast<uint32_t>(group);
      group_hi[j] = static_cast<uint32_t>(group >> 32);
    }
    __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(group_lo));
    __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(group_hi));
    __m256i v2 = stream_lo, v3 = stream_hi;
    uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(v0, math::kPhiloxM0, hi0, lo0);
      mulhilo8(v2, math::kPhiloxM1, hi1, lo1);
      const __m256i next0 = _mm256_xor_si256(_mm256_xor_si256(hi1, v1), _mm256_set1_epi32(static_cast<int>(key0)));
      const __m256i next2 = _mm256_xor_si256(_mm256_xor_si256(hi0, v3), _mm256_set1_epi32(static_cast<int>(key1)));
      v0 = next0;
      v1 = lo1;
      v2 = next2;
      v3 = lo0;
      key0 += math::kPhiloxW0;
      key1 += math::kPhiloxW1;
    }
    // Pair p of a group uses bits (v[2p], v[2p + 1]): radius from v0 / v2, angle from v1 / v3.
    const __m256 two_pi = _mm256_set1_ps(6.283185307179586f);
    const __m256 minus_two = _mm256_set1_ps(-2.0f);
    const __m256 radius0 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, Sleef_logf8_u10avx2(uniform_open01_avx2(v0))));
    const __m256 radius1 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, Sleef_logf8_u10avx2(uniform_open01_avx2(v2))));
    const SleefFloat8Pair angle0 = Sleef_sincosf8_u10avx2(_mm256_mul_ps(two_pi, uniform_open01_avx2(v1)));
    const SleefFloat8Pair angle1 = Sleef_sincosf8_u10avx2(_mm256_mul_ps(two_pi, uniform_open01_avx2(v3)));
    alignas(32) float n0[8], n1[8], n2[8], n3[8];
    _mm256_store_ps(n0, _mm256_mul_ps(radius0, angle0.y));  // radius * cos
    _mm256_store_ps(n1, _mm256_mul_ps(radius0, angle0.x));  // radius * sin
    _mm256_store_ps(n2, _mm256_mul_ps(radius1, angle1.y));
    _mm256_store_ps(n3, _mm256_mul_ps(radius1, angle1.x));
    alignas(32) float scratch[32];
    const bool partial = g + 8 > count;
    float* dst = partial ? scratch : out + 4 * g;
    for (int j = 0; j < 8; ++j) {
      dst[4 * j] = n0[j];
      dst[4 * j + 1] = n1[j];
      dst[4 * j + 2] = n2[j];
      dst[4 * j + 3] = n3[j];
    }
    if (partial) {
      for (int64_t i = 0; i < 4 * (count - g); ++i) out[4 * g + i] = scratch[i];
    }
  }
}

__attribute__((target("avx2,fma"))) void posterior_std_avx2(const float* logvar, int64_t n, float* std) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 half = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_loadu_ps(logvar + i));
    _mm256_storeu_ps(std + i, Sleef_expf8_u10avx2(half));
  }
  if (i < n) {  // the last n % 8 through the same vector exp (padded), not the scalar one: an
                // element's std must not depend on where its sub-block starts (the work is cut
                // per sample or per tensor depending on the reduction)
    alignas(32) float padded[8] = {};
    for (int64_t j = 0; i + j < n; ++j) padded[j] = logvar[i + j];
    alignas(32) float out[8];
    _mm256_store_ps(out, Sleef_expf8_u10avx2(_mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_load_ps(padded))));
    for (int64_t j = 0; i + j < n; ++j) std[i + j] = out[j];
  }
}
#endif  // FASTELBO_X86_64

}  // namespace

bool cpu_vector_paths_enabled() { return vector_paths_enabled.load(std::memory_order_relaxed); }

bool set_cpu_vector_paths_enabled(bool enabled) { return vector_paths_enabled.exchange(enabled); }

void posterior_std_block(const float* logvar, int64_t n, float* std) {
#if FASTELBO_X86_64
  if (use_avx2()) return posterior_std_avx2(logvar, n, std);
#endif
  for (int64_t i = 0; i < n; ++i) std[i] = math::posterior_std(logvar[i]);
}

void posterior_std_block(const double* logvar, int64_t n, double* std) {
  for (int64_t i = 0; i < n; ++i) std[i] = math::posterior_std(logvar[i]);
}

void fill_normal_groups(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, float* out) {
#if FASTELBO_X86_64
  if (use_avx2()) return fill_avx2(seed, stream, first_group, count, out);
#endif
  fill_scalar<float>(seed, stream, first_group, count, out);
}

void fill_normal_groups(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, double* out) {
  fill_scalar<double>(seed, stream, first_group, count, out);
}

}  // namespace cpu
}  // namespace fastelbo
