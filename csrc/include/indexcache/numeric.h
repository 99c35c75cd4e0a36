// Scalar number-format helpers shared by the CPU implementation and the CUDA kernels, so both
// quantise, round and order values bit-identically. Torch-free and CUDA-header-free.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "indexcache/params.h"

#if defined(__CUDACC__)
#define INDEXCACHE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define INDEXCACHE_HOST_DEVICE inline
#endif

namespace indexcache {

INDEXCACHE_HOST_DEVICE uint32_t float_as_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

INDEXCACHE_HOST_DEVICE float bits_as_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN, 448 the largest finite value.
// Every e4m3 value is exact in float, and so is the product of two of them (4 + 4 significant bits).
INDEXCACHE_HOST_DEVICE float e4m3_to_float(uint8_t v) {
  const uint32_t sign = uint32_t(v & 0x80u) << 24;
  const uint32_t exponent = (v >> 3) & 0xFu;
  const uint32_t mantissa = v & 0x7u;
  if ((v & 0x7Fu) == 0x7Fu) return bits_as_float(sign | 0x7FC00000u);
  if (exponent == 0) {
    // Subnormal: mantissa * 2^-9.
    return bits_as_float(sign | float_as_bits(float(mantissa) * (1.0f / 512.0f)));
  }
  return bits_as_float(sign | ((exponent + (127 - 7)) << 23) | (mantissa << 20));
}

// Round to nearest even, saturating to +-448 (infinities included): a quantiser must never turn an
// outlier into NaN, which is what a plain cast (torch's .to(float8_e4m3fn)) does above 464.
// NaN stays NaN (sign kept).
INDEXCACHE_HOST_DEVICE uint8_t float_to_e4m3(float x) {
  uint32_t bits = float_as_bits(x);
  const uint8_t sign = uint8_t((bits >> 24) & 0x80u);
  bits &= 0x7FFFFFFFu;
  if (bits > 0x7F800000u) return sign | 0x7Fu;
  if (bits >= 0x43E00000u) return sign | 0x7Eu;  // |x| >= 448
  if (bits < 0x3C800000u) {
    // |x| < 2^-6, e4m3's subnormal range (steps of 2^-9). Adding 2^14 makes the float ulp 2^-9, so
    // the FPU's own round-to-nearest-even picks the mantissa, left in the low bits; a round-up to
    // 8 * 2^-9 = 2^-6 yields 0x08, which is exactly the smallest normal's encoding.
    const float shifted = bits_as_float(bits) + 16384.0f;
    return sign | uint8_t(float_as_bits(shifted) - 0x46800000u);
  }
  // Normal: rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits, ties to even.
  const uint32_t kept_lsb = (bits >> 20) & 1u;
  bits += (uint32_t(7 - 127) << 23) + 0x7FFFFu + kept_lsb;
  return sign | uint8_t(bits >> 20);
}

INDEXCACHE_HOST_DEVICE float bf16_to_float(uint16_t b) { return bits_as_float(uint32_t(b) << 16); }

// Round to nearest even (overflow goes to inf, as in torch). A NaN is forced quiet: truncating
// its payload could otherwise leave an all-zero mantissa, i.e. an infinity.
INDEXCACHE_HOST_DEVICE uint16_t float_to_bf16(float x) {
  const uint32_t bits = float_as_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((bits >> 16) | 0x0040u);
  return uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Unsigned key with key(a) < key(b) exactly when a < b under the top-k total order
// NaN < -inf < ... < +inf, so a radix select can work on keys alone. Every NaN maps to 0, below
// -inf's key 0x007FFFFF. -0.0 is folded onto +0.0 so the two zeros are equal (as `==` says) and
// their tie goes to the smaller index like any other tie.
INDEXCACHE_HOST_DEVICE uint32_t topk_order_key(float x) {
  uint32_t bits = float_as_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0u;
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Scale that maps a block's largest magnitude amax onto 448; values are stored as
// float_to_e4m3(x / scale). amax is floored at 1e-4 as in DeepSeek-V3.2's quantiser (and vLLM's
// cache writers), so all-zero and tiny blocks get the same bytes as theirs and never divide by
// zero. pow2 rounds the scale up to a power of two (DeepSeek-V3.2's UE8M0 scales), computed
// exactly with frexp: exp2(ceil(log2(s))) can round a value just above 2^e down to 2^e, which
// would then saturate.
constexpr float kQuantAmaxFloor = 1e-4f;

INDEXCACHE_HOST_DEVICE float e4m3_quant_scale(float amax, bool pow2) {
  const float scale = fmaxf(amax, kQuantAmaxFloor) / kE4m3Max;
  if (!pow2 || scale > FLT_MAX) return scale;
  int exponent;
  const float fraction = frexpf(scale, &exponent);  // scale = fraction * 2^exponent, fraction in [0.5, 1)
  return fraction == 0.5f ? scale : ldexpf(1.0f, exponent);
}

}  // namespace indexcache
