// The transcendental-heavy parts of the sample+KL kernels, vectorized with AVX2 where the
// processor has it: the standard normals of consecutive Philox groups, and std = exp(logvar / 2).
//
// Why: the scalar Box-Muller (log, sqrt, sincos per pair) costs about 19 ns per normal here and
// expf about 7 ns, more than everything else the kernels do per element, and eager PyTorch's
// randn and exp are vectorized. The AVX2 path computes the same formula (DESIGN.md section 5: the counter layout
// and the transform of csrc/elbo_math.h) with SLEEF's 1-ulp vector log and sincos, which
// libtorch_cpu ships; the result can differ from the scalar path in the last bit. The symbols
// are declared weak, so a torch without them falls back to the scalar path instead of failing
// to load.
#include <immintrin.h>

#include <cstdint>

#include "../elbo_math.h"
#include "cpu_common.h"

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

namespace fastelbo {
namespace cpu {
namespace {

bool use_avx2() {
  static const bool available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                &Sleef_logf8_u10avx2 != nullptr &&
                                &Sleef_sincosf8_u10avx2 != nullptr && &Sleef_expf8_u10avx2 != nullptr;
  return available;
}

template <typename acc_t>
void fill_scalar(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, acc_t* out) {
  for (int64_t g = 0; g < count; ++g) {
    const math::Normal4<acc_t> n = math::normal_group<acc_t>(seed, stream, first_group + g);
    for (int l = 0; l < 4; ++l) out[4 * g + l] = n.v[l];
  }
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

// Four groups (16 normals) per iteration: the Philox bits scalar, the 8 Box-Muller pairs at once.
// A last partial iteration computes all four groups into a scratch buffer and copies what was
// asked for (cheaper than the scalar Box-Muller for even one group).
__attribute__((target("avx2,fma"))) void fill_avx2(uint64_t seed, uint64_t stream,
                                                    uint64_t first_group, int64_t count, float* out) {
  for (int64_t g = 0; g < count; g += 4) {
    alignas(32) float scratch[16];
    const bool partial = g + 4 > count;
    alignas(32) uint32_t u_radius[8], u_angle[8];
    for (int k = 0; k < 4; ++k) {
      const math::Philox4 bits = math::philox_group_bits(seed, stream, first_group + g + k);
      // Pair p of group k (lanes 2k + p) uses bits (v[2p], v[2p + 1]), as box_muller4 does.
      u_radius[2 * k] = bits.v[0];
      u_angle[2 * k] = bits.v[1];
      u_radius[2 * k + 1] = bits.v[2];
      u_angle[2 * k + 1] = bits.v[3];
    }
    const __m256 u1 = uniform_open01_avx2(_mm256_load_si256(reinterpret_cast<const __m256i*>(u_radius)));
    const __m256 u2 = uniform_open01_avx2(_mm256_load_si256(reinterpret_cast<const __m256i*>(u_angle)));
    const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), Sleef_logf8_u10avx2(u1)));
    const SleefFloat8Pair sincos = Sleef_sincosf8_u10avx2(_mm256_mul_ps(_mm256_set1_ps(6.283185307179586f), u2));
    alignas(32) float cos_part[8], sin_part[8];
    _mm256_store_ps(cos_part, _mm256_mul_ps(radius, sincos.y));
    _mm256_store_ps(sin_part, _mm256_mul_ps(radius, sincos.x));
    float* dst = partial ? scratch : out + 4 * g;
    for (int lane = 0; lane < 8; ++lane) {
      dst[2 * lane] = cos_part[lane];
      dst[2 * lane + 1] = sin_part[lane];
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
  for (; i < n; ++i) std[i] = math::posterior_std(logvar[i]);
}

}  // namespace

void posterior_std_block(const float* logvar, int64_t n, float* std) {
  if (use_avx2()) {
    posterior_std_avx2(logvar, n, std);
  } else {
    for (int64_t i = 0; i < n; ++i) std[i] = math::posterior_std(logvar[i]);
  }
}

void posterior_std_block(const double* logvar, int64_t n, double* std) {
  for (int64_t i = 0; i < n; ++i) std[i] = math::posterior_std(logvar[i]);
}

void fill_normal_groups(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, float* out) {
  if (use_avx2()) {
    fill_avx2(seed, stream, first_group, count, out);
  } else {
    fill_scalar<float>(seed, stream, first_group, count, out);
  }
}

void fill_normal_groups(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, double* out) {
  fill_scalar<double>(seed, stream, first_group, count, out);
}

}  // namespace cpu
}  // namespace fastelbo
