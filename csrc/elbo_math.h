// The per-element math of fastelbo, written once and used by the CPU and the CUDA kernels.
//
// Everything here is a pure inline function over scalars, so that both backends compute exactly
// the same formulas: the counter-based normal generator (Philox4x32-10 + Box-Muller), the
// reparameterized sample, the Gaussian KL, the squared-error reconstruction and their gradients.
// See shared/DESIGN.md sections 1 and 5 for the math and the RNG design.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTELBO_HD __host__ __device__ __forceinline__
#else
#define FASTELBO_HD inline
#endif

namespace fastelbo {

// Reduction codes shared by the Python front door, the op schemas and the kernels.
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2, kBatchMean = 3 };

namespace math {

// ---------------------------------------------------------------------------------------------
// Overloads that pick the float or double libm function, on host and device alike.
FASTELBO_HD float exp_(float x) { return ::expf(x); }
FASTELBO_HD double exp_(double x) { return ::exp(x); }
// expm1 near 0 in float, where exp(x) - 1 would cancel: a degree-8 Taylor polynomial (truncation
// < 2e-8 relative for |x| < 1/2), x + x^2 p(x). (glibc's expm1f is an order of magnitude slower
// than its expf.) The KL needs expm1(x) - x, which is x^2 p(x) itself: adding x and taking it off
// again would leave only the last bits of x (see expm1_minus_logvar).
FASTELBO_HD float taylor_expm1_tail_(float x) {  // p(x) = (expm1(x) - x) / x^2
  float p = 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  return p * x + 0.5f;
}
FASTELBO_HD float taylor_expm1_(float x) { return x + x * x * taylor_expm1_tail_(x); }
FASTELBO_HD float log_(float x) { return ::logf(x); }
FASTELBO_HD double log_(double x) { return ::log(x); }
FASTELBO_HD float sqrt_(float x) { return ::sqrtf(x); }
FASTELBO_HD double sqrt_(double x) { return ::sqrt(x); }
// sin and cos of one angle in one call (glibc and CUDA both provide sincos).
FASTELBO_HD void sincos_(float x, float* sin_x, float* cos_x) { ::sincosf(x, sin_x, cos_x); }
FASTELBO_HD void sincos_(double x, double* sin_x, double* cos_x) { ::sincos(x, sin_x, cos_x); }

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
struct Philox4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

FASTELBO_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * ctr.v[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * ctr.v[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr = Philox4{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
    key0 += kPhiloxW0;
    key1 += kPhiloxW1;
  }
  return ctr;
}

// Counter layout: element i of draw k of one call uses counter group g = i / 4 and lane i % 4:
//   counter = (lo(g), hi(g), lo(offset + k), hi(offset + k) ^ kStreamTag), key = (lo(seed), hi(seed)).
// The normal therefore depends only on (seed, offset, k, i), never on threads, grid or block size.
// kStreamTag keeps our counters disjoint from curand-style counters that share the generator
// (PyTorch's kernels put a thread index < 2^32 in the high words, so their word 3 is zero).
constexpr uint32_t kStreamTag = 0xE1B05EEDu;

FASTELBO_HD Philox4 philox_group_bits(uint64_t seed, uint64_t stream, uint64_t group) {
  const Philox4 ctr{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                     static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32) ^ kStreamTag}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

template <typename acc_t>
struct Normal4 {
  acc_t v[4];
};

// Maps a 32-bit integer to the open interval (0, 1): never 0, so log() stays finite.
template <typename acc_t>
FASTELBO_HD acc_t uniform_open01(uint32_t bits) {
  return static_cast<acc_t>(bits) * static_cast<acc_t>(2.3283064365386963e-10) +  // 2^-32
         static_cast<acc_t>(1.1641532182693481e-10);                               // 2^-33
}

// Tells the GPU compiler what is true of a Box-Muller angle, 2 pi u with u in (0, 1]: it is far below
// the arguments for which CUDA's sincosf (|x| >= 105615) and sincos (|x| >= 2^31) take their slow
// path (Payne-Hanek reduction through local memory). Written exactly as those tests, so that the
// compiler drops the slow path and its branch; the fast path it keeps computes the same bits.
// tests/test_codegen.py checks that the path is gone. Nothing on the host.
#if defined(__CUDA_ARCH__)
#define FASTELBO_DEVICE_ASSUME(condition) __builtin_assume(condition)
#else
#define FASTELBO_DEVICE_ASSUME(condition) ((void)sizeof(condition))  // not evaluated
#endif
FASTELBO_HD void assume_box_muller_angle(float angle) {
  FASTELBO_DEVICE_ASSUME(!(::fabsf(angle) >= 105615.0f));
}
FASTELBO_HD void assume_box_muller_angle(double angle) {
  FASTELBO_DEVICE_ASSUME(!(::fabs(angle) >= 2147483648.0));
}

// Box-Muller: two uniforms give two independent standard normals; four bits give four normals.
// The logs and the sines and cosines of both pairs come first, the square roots last: on a GPU the
// square root has a branch to a slow path (zero, denormals), and everything before it is then
// one branch-free stretch in which the compiler interleaves the two pairs' polynomial chains (at
// small sizes a thread's dependent chain is what a sampling kernel waits for). The order of the
// statements changes no result.
template <typename acc_t>
FASTELBO_HD Normal4<acc_t> box_muller4(Philox4 bits) {
  constexpr acc_t kTwoPi = static_cast<acc_t>(6.283185307179586);
  acc_t log_u[2], sin_angle[2], cos_angle[2];
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    log_u[pair] = log_(uniform_open01<acc_t>(bits.v[2 * pair]));
    const acc_t angle = kTwoPi * uniform_open01<acc_t>(bits.v[2 * pair + 1]);
    assume_box_muller_angle(angle);
    sincos_(angle, &sin_angle[pair], &cos_angle[pair]);
  }
  Normal4<acc_t> out;
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    const acc_t radius = sqrt_(static_cast<acc_t>(-2) * log_u[pair]);
    out.v[2 * pair] = radius * cos_angle[pair];
    out.v[2 * pair + 1] = radius * sin_angle[pair];
  }
  return out;
}

// The four standard normals of counter group `group` in draw stream `stream` (= offset + k).
template <typename acc_t>
FASTELBO_HD Normal4<acc_t> normal_group(uint64_t seed, uint64_t stream, uint64_t group) {
  return box_muller4<acc_t>(philox_group_bits(seed, stream, group));
}

// ---------------------------------------------------------------------------------------------
// Reparameterized sample and Gaussian KL against N(0, I).

// std = exp(logvar / 2).
template <typename acc_t>
FASTELBO_HD acc_t posterior_std(acc_t logvar) {
  return exp_(static_cast<acc_t>(0.5) * logvar);
}

template <typename acc_t>
FASTELBO_HD acc_t reparameterized_sample(acc_t mu, acc_t std, acc_t eps) {
  return mu + std * eps;
}

// exp(logvar) - 1 given std = exp(logvar / 2), already computed for z: std^2 - 1 where that does
// not cancel (|logvar| >= 1/2, within 4 ulp), the series near 0 where it would (the posterior
// collapsed onto the prior). One exponential per element instead of two; NaN and +-inf give NaN,
// inf and -1. float64: expm1 itself.
// Both candidates are computed and one is selected, with no branch: the CPU's per-element loops
// vectorize that way (a branch here kept them scalar, 3x slower), and a GPU warp with logvars on
// both sides of 1/2 runs both anyway.
constexpr float kSeriesEdge = 0.5f;  // |logvar| below it: the series (here and in expm1_minus_logvar)
FASTELBO_HD float expm1_logvar(float logvar, float std) {
  const float series = taylor_expm1_(logvar);
  const float from_std = std * std - 1.0f;
  return ::fabsf(logvar) < kSeriesEdge ? series : from_std;
}
FASTELBO_HD double expm1_logvar(double logvar, double /*std*/) { return ::expm1(logvar); }

// exp(logvar) - 1 - logvar, the KL's part that does not depend on mu. Near logvar = 0 (a collapsed
// posterior, where this is about logvar^2 / 2) it is the series' tail x^2 p(x) directly:
// expm1_logvar(logvar) - logvar cancels the leading logvar and kept only its last bits (relative
// errors of 0.1 at |logvar| ~ 1e-6, 1e-2 at 1e-5, 1e-4 at 1e-3). Elsewhere std^2 - 1 - logvar.
// float64: expm1 - logvar (relative error ~2e-16 / |logvar|: below float32's series down to
// |logvar| ~ 1e-9).
FASTELBO_HD float expm1_minus_logvar(float logvar, float std) {
  const float series = logvar * logvar * taylor_expm1_tail_(logvar);
  const float from_std = std * std - 1.0f - logvar;
  return ::fabsf(logvar) < kSeriesEdge ? series : from_std;
}
FASTELBO_HD double expm1_minus_logvar(double logvar, double /*std*/) { return ::expm1(logvar) - logvar; }

// kl = 1/2 (mu^2 + exp(logvar) - 1 - logvar), with std = exp(logvar / 2).
template <typename acc_t>
FASTELBO_HD acc_t kl_element(acc_t mu, acc_t logvar, acc_t std) {
  return static_cast<acc_t>(0.5) * (mu * mu + expm1_minus_logvar(logvar, std));
}

// Gradients of one latent element. grad_z_sum = sum_k g_z[k]; grad_z_eps_sum = sum_k g_z[k] * eps[k]
// (the backward regenerates eps from the saved RNG state instead of using (z - mu) / std, which
// cancels catastrophically in half precision when |mu| >> std); grad_kl is the per-element KL
// gradient (incoming gradient times the reduction's scale and the free-bits mask).
// Terms: the z term and the KL term; `terms` says which ones received an incoming gradient. A term
// without one (z or the KL unused) is left out, as autograd leaves out an unused branch, instead of
// being multiplied by a zero gradient: 0 * mu for an infinite mu, or 0 * std for an exp(logvar / 2)
// that overflowed, is a NaN where the term is simply absent. With both terms the expressions are
// the plain formulas (the same bits as ever); the choice is a select the CPU loops vectorize.
struct GradTerms {
  bool z;
  bool kl;
};

template <typename acc_t>
FASTELBO_HD acc_t grad_mu_element(acc_t mu, acc_t grad_z_sum, acc_t grad_kl, GradTerms terms) {
  if (terms.z && terms.kl) return grad_z_sum + grad_kl * mu;
  return terms.z ? grad_z_sum : terms.kl ? grad_kl * mu : acc_t(0);
}

template <typename acc_t>
FASTELBO_HD acc_t grad_logvar_element(acc_t logvar, acc_t std, acc_t grad_z_eps_sum, acc_t grad_kl,
                                      GradTerms terms) {
  constexpr acc_t kHalf = static_cast<acc_t>(0.5);
  if (terms.z && terms.kl) return kHalf * (std * grad_z_eps_sum + grad_kl * expm1_logvar(logvar, std));
  return terms.z ? kHalf * (std * grad_z_eps_sum) : terms.kl ? kHalf * (grad_kl * expm1_logvar(logvar, std)) : acc_t(0);
}
template <typename acc_t>
FASTELBO_HD acc_t grad_logvar_element(acc_t logvar, acc_t grad_z_eps_sum, acc_t grad_kl, GradTerms terms) {
  return grad_logvar_element(logvar, posterior_std(logvar), grad_z_eps_sum, grad_kl, terms);
}

// Free bits: position j's batch-mean KL kbar_j enters the loss as max(kbar_j, free_bits), so its
// KL gradient flows only where kbar_j > free_bits, as in fastelbo.reference: not below the floor,
// not at it (a tie; torch.clamp(min=) passes none there in torch 2.14, one in older versions), nor where
// kbar_j is NaN (the loss is NaN then).
template <typename acc_t>
FASTELBO_HD bool free_bits_pass_gradient(acc_t position_mean, acc_t free_bits) {
  return position_mean > free_bits;
}

// ---------------------------------------------------------------------------------------------
// Unit-variance Gaussian decoder: rec = 1/2 (x_hat - x)^2, d rec / d x_hat = x_hat - x.
template <typename acc_t>
FASTELBO_HD acc_t recon_element(acc_t x_hat, acc_t x) {
  const acc_t diff = x_hat - x;
  return diff * diff / 2;  // = 0.5 * diff^2 exactly; written so it also applies to SIMD vectors
}

template <typename acc_t>
FASTELBO_HD acc_t grad_x_hat_element(acc_t x_hat, acc_t x, acc_t grad_rec) {
  return grad_rec * (x_hat - x);
}

}  // namespace math
}  // namespace fastelbo
