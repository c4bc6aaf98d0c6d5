// Block-level arithmetic of kvq2/kvq3 shared by the CUDA kernels and a host-side test.
//
// Everything here is written once and compiled twice: by nvcc as device code (the CUDA
// backend's SET_ROWS, CPY, GET_ROWS, f16 conversion and flash-attention paths) and by the
// host compiler for native/cuda/kvq-block-check.cpp, which pytest runs against the scalar
// reference (native/src/pyadaq-quants.c). So the GPU's arithmetic is checked on any machine;
// only the kernels' indexing around it needs a GPU (scripts/gpu-check.sh).
//
// The quantizer repeats the reference's float operations in the reference's order with
// explicitly rounded intrinsics (nvcc would otherwise fuse multiply-adds), so it gives the
// same bytes, except that ggml-cuda is built with -use_fast_math, which flushes denormal
// floats to zero: blocks whose values or products are denormal can differ.

#pragma once

#include "pyadaq-quants.h"

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#    include <cuda_fp16.h>
#    define PYADAQ_HD __host__ __device__ __forceinline__
#else
#    include <math.h>
#    define PYADAQ_HD inline
#endif

#define PYADAQ_KVQ_QK 32

typedef block_pyadaq_2x32 block_kvq2;
typedef block_pyadaq_3x32 block_kvq3;
static_assert(sizeof(block_kvq2) == 2 + PYADAQ_KVQ_QK / 4, "wrong kvq2 block size/padding");
static_assert(sizeof(block_kvq3) == 2 + PYADAQ_KVQ_QK / 4 + PYADAQ_KVQ_QK / 8, "wrong kvq3 block size/padding");

template <int BITS> struct pyadaq_kvq_block;
template <> struct pyadaq_kvq_block<2> { typedef block_kvq2 type; };
template <> struct pyadaq_kvq_block<3> { typedef block_kvq3 type; };

// The codebooks of pyadaq-quants.c (pyadaq_levels_n2 / pyadaq_levels_n3), as compile-time
// values so that device code needs no table in memory.
template <int BITS> PYADAQ_HD constexpr int pyadaq_kvq_level(int i);
template <> PYADAQ_HD constexpr int pyadaq_kvq_level<2>(int i) {
    return i == 0 ? -127 : i == 1 ? -38 : i == 2 ? 38 : 127;
}
template <> PYADAQ_HD constexpr int pyadaq_kvq_level<3>(int i) {
    return i == 0 ? -127 : i == 1 ? -79 : i == 2 ? -45 : i == 3 ? -14 : i == 4 ? 14 : i == 5 ? 45 : i == 6 ? 79 : 127;
}

// The levels packed four int8 per 32-bit word (levels 0-3, levels 4-7), for byte permutes.
template <int BITS> PYADAQ_HD constexpr uint32_t pyadaq_kvq_levels_word(int half) {
    return (uint32_t) (uint8_t) (int8_t) pyadaq_kvq_level<BITS>(4 * half + 0) |
           (uint32_t) (uint8_t) (int8_t) pyadaq_kvq_level<BITS>(4 * half + 1) << 8 |
           (uint32_t) (uint8_t) (int8_t) pyadaq_kvq_level<BITS>(4 * half + 2) << 16 |
           (uint32_t) (uint8_t) (int8_t) pyadaq_kvq_level<BITS>(4 * half + 3) << 24;
}

// --- single-precision operations, rounded as written -------------------------------------

PYADAQ_HD float pyadaq_fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b; // the host test is compiled with -ffp-contract=off
#endif
}
PYADAQ_HD float pyadaq_fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
PYADAQ_HD float pyadaq_fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b); // IEEE division even under -use_fast_math
#else
    return a / b;
#endif
}

// fp32 -> fp16 bits, round to nearest even (GGML_FP32_TO_FP16 on the CPU).
PYADAQ_HD uint16_t pyadaq_f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) { // inf or nan
        return (uint16_t) (sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    }
    if (ax >= 0x477ff000u) { // rounds to >= 65520: overflow
        return (uint16_t) (sign | 0x7c00u);
    }
    if (ax < 0x38800000u) { // below the smallest normal half: subnormal or zero
        if (ax < 0x33000000u) {
            return (uint16_t) sign; // below half of the smallest subnormal
        }
        const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int) (ax >> 23); // 14 + (113 - exp)
        const uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u);
        const uint32_t halfway = 1u << (shift - 1);
        const uint32_t r = q + (rem > halfway || (rem == halfway && (q & 1u)));
        return (uint16_t) (sign | r);
    }
    const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u); // round to nearest even at bit 13
    return (uint16_t) (sign | (((r - 0x38000000u) >> 13) & 0x7fffu));
#endif
}

PYADAQ_HD float pyadaq_f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    uint32_t x;
    if (e == 0x1fu) {
        x = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        x = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
        x = sign;
    } else { // subnormal half: normalize
        int ee = 113;
        while (!(m & 0x400u)) {
            m <<= 1;
            --ee;
        }
        x = sign | ((uint32_t) ee << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
#endif
}

// --- quantization of one block (the reference's PYADAQ_SCALE_MSE rule) --------------------

// Index of the level nearest to v: how many midpoints between neighbouring levels v exceeds.
// The midpoints are half-sums of integers, exact in single precision, as in the reference.
template <int BITS>
PYADAQ_HD int pyadaq_kvq_nearest(float v) {
    int idx = 0;
#if defined(__CUDA_ARCH__)
#    pragma unroll
#endif
    for (int i = 0; i + 1 < (1 << BITS); ++i) {
        idx += v > 0.5f * (float) (pyadaq_kvq_level<BITS>(i) + pyadaq_kvq_level<BITS>(i + 1));
    }
    return idx;
}

template <int BITS>
PYADAQ_HD void pyadaq_kvq_quantize_block(const float * __restrict__ x, typename pyadaq_kvq_block<BITS>::type * __restrict__ y) {
    constexpr int QK = PYADAQ_KVQ_QK;
    constexpr int NL = 1 << BITS;
    const float lmax = (float) pyadaq_kvq_level<BITS>(NL - 1);

    float xs[QK];
    float amax = 0.0f;
#if defined(__CUDA_ARCH__)
#    pragma unroll
#endif
    for (int j = 0; j < QK; ++j) {
        xs[j] = isfinite(x[j]) ? x[j] : 0.0f;
        const float a = fabsf(xs[j]);
        if (a > amax) {
            amax = a;
        }
    }

    float d = 0.0f;
    float inv_best = 0.0f; // 0: every value gets the middle index (all-zero block)
    if (amax != 0.0f) {
        // Least squares over the reference's trial scales; the best trial's indices are
        // recomputed below from its inverse scale instead of being copied per trial.
        const float base = pyadaq_fdiv(lmax, amax);
        float best_score = -1.0f;
        float best_sxl = 0.0f;
        float best_sll = 1.0f;
        for (int t = 0; t < PYADAQ_SEARCH_N; ++t) {
            const float inv = pyadaq_fmul(base, pyadaq_fadd(PYADAQ_SEARCH_LO, pyadaq_fmul((float) t, PYADAQ_SEARCH_STEP)));
            float sxl = 0.0f;
            float sll = 0.0f;
#if defined(__CUDA_ARCH__)
#    pragma unroll
#endif
            for (int j = 0; j < QK; ++j) {
                const float l = (float) pyadaq_kvq_level<BITS>(pyadaq_kvq_nearest<BITS>(pyadaq_fmul(xs[j], inv)));
                sxl = pyadaq_fadd(sxl, pyadaq_fmul(xs[j], l));
                sll = pyadaq_fadd(sll, pyadaq_fmul(l, l));
            }
            const float score = pyadaq_fdiv(pyadaq_fmul(sxl, sxl), sll);
            if (score > best_score) {
                best_score = score;
                best_sxl = sxl;
                best_sll = sll;
                inv_best = inv;
            }
        }
        d = pyadaq_fdiv(best_sxl, best_sll);
    }

    y->d = pyadaq_f32_to_f16(d);
    uint8_t hbits[QK / 8] = { 0 };
#if defined(__CUDA_ARCH__)
#    pragma unroll
#endif
    for (int i = 0; i < 8; ++i) {
        uint8_t q = 0;
#if defined(__CUDA_ARCH__)
#    pragma unroll
#endif
        for (int k = 0; k < 4; ++k) {
            const int j = 8 * k + i;
            const int idx = amax != 0.0f ? pyadaq_kvq_nearest<BITS>(pyadaq_fmul(xs[j], inv_best)) : NL / 2;
            q |= (uint8_t) ((idx & 3) << (2 * k));
            hbits[k] |= (uint8_t) (((idx >> 2) & 1) << i);
        }
        y->qs[i] = q;
    }
    if constexpr (BITS == 3) {
#if defined(__CUDA_ARCH__)
#    pragma unroll
#endif
        for (int k = 0; k < QK / 8; ++k) {
            y->qh[k] = hbits[k];
        }
    }
}

// --- indices and levels of four consecutive values ---------------------------------------

// 32 bits from a 2-byte aligned address (blocks are 10 or 14 bytes long).
PYADAQ_HD uint32_t pyadaq_load_u32_a2(const uint8_t * p) {
#if defined(__CUDA_ARCH__)
    const uint16_t * p16 = (const uint16_t *) p;
    return (uint32_t) p16[0] | (uint32_t) p16[1] << 16;
#else
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#endif
}

// Level indices of values j0 .. j0+3 of a block (j0 % 4 == 0), one per byte.
// Value 8k + i sits in bits 2k..2k+1 of qs[i] and bit i of qh[k].
template <int BITS>
PYADAQ_HD uint32_t pyadaq_kvq_idx4(const typename pyadaq_kvq_block<BITS>::type * b, int j0) {
    uint32_t q = pyadaq_load_u32_a2(b->qs + 4 * ((j0 >> 2) & 1));
    q = (q >> (2 * (j0 >> 3))) & 0x03030303u;
    if constexpr (BITS == 3) {
        const uint32_t h = ((uint32_t) b->qh[j0 >> 3] >> (j0 & 4)) & 0xfu;
        q |= ((h & 1u) << 2) | ((h & 2u) << 9) | ((h & 4u) << 16) | ((h & 8u) << 23);
    }
    return q;
}

// CUDA's __byte_perm(x, y, s) for selectors 0-7: byte n of the result is byte (s >> 4n) & 7
// of the eight bytes y:x.
PYADAQ_HD uint32_t pyadaq_byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(x, y, s);
#else
    const uint64_t xy = (uint64_t) x | (uint64_t) y << 32;
    uint32_t r = 0;
    for (int n = 0; n < 4; ++n) {
        r |= (uint32_t) ((xy >> (8 * ((s >> (4 * n)) & 7))) & 0xffu) << (8 * n);
    }
    return r;
#endif
}

// The int8 levels of four indices (one per byte), packed like the indices: the operand of a
// dp4a against Q quantized to 8 bits.
template <int BITS>
PYADAQ_HD int pyadaq_kvq_levels4(uint32_t idx4) {
    const uint32_t sel = (idx4 & 0x7u) | ((idx4 >> 4) & 0x70u) | ((idx4 >> 8) & 0x700u) | ((idx4 >> 12) & 0x7000u);
    return (int) pyadaq_byte_perm(pyadaq_kvq_levels_word<BITS>(0), pyadaq_kvq_levels_word<BITS>(1), sel);
}

// The int8 levels of values j0 .. j0+3 (j0 % 4 == 0).
template <int BITS>
PYADAQ_HD int pyadaq_kvq_get_levels4(const typename pyadaq_kvq_block<BITS>::type * b, int j0) {
    return pyadaq_kvq_levels4<BITS>(pyadaq_kvq_idx4<BITS>(b, j0));
}

// Values j and j+1 of a block (j even) as floats: d * level, the reference's product.
template <int BITS>
PYADAQ_HD void pyadaq_kvq_dequant2(const typename pyadaq_kvq_block<BITS>::type * b, int j, float * v0, float * v1) {
    const int q = pyadaq_kvq_get_levels4<BITS>(b, j & ~3) >> (8 * (j & 2));
    const float d = pyadaq_f16_to_f32(b->d);
    *v0 = pyadaq_fmul(d, (float) (int8_t) (q & 0xff));
    *v1 = pyadaq_fmul(d, (float) (int8_t) ((q >> 8) & 0xff));
}
