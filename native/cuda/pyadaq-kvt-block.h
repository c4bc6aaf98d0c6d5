// Block-level arithmetic of the transform-coded types (kvt1, kvt2, kvt3, kvt4, kvt2s, kvt3s, kvt4s)
// shared by the CUDA kernels and a host-side test, as pyadaq-kvq-block.h is for kvq2/kvq3.
//
// The reference is native/src/pyadaq-kvt.c: a block of 64 values is a one-byte scale code e and 8
// groups of 8 values; group g has WIDTH[g] bit planes (0..7 bits per value), an index into the
// Lloyd-Max levels of a unit Gaussian (pyadaq-kvt-levels.h), decoded as d * level with
// d = 2^((e - 128) / 8) (0 for e = 0). The quantizer tries 16 scale codes around the weighted rms
// and keeps the one of least weighted squared error.
// Everything below repeats the reference's float operations in its order with explicitly
// rounded intrinsics, so it writes the same bytes, except that ggml-cuda's -use_fast_math
// flushes denormal floats to zero (blocks whose values, products or mean square ss / sw are
// denormal can differ: a block the reference gives code 1 can get code 0 here).

#pragma once

#include "pyadaq-kvq-block.h"
#include "pyadaq-kvt-levels.h"

#define PYADAQ_KVT_LEVEL_TABLES(QUAL, prefix)                                              \
    QUAL float prefix##1[2] = PYADAQ_KVT_LEVELS_1;                                         \
    QUAL float prefix##2[4] = PYADAQ_KVT_LEVELS_2;                                         \
    QUAL float prefix##3[8] = PYADAQ_KVT_LEVELS_3;                                         \
    QUAL float prefix##4[16] = PYADAQ_KVT_LEVELS_4;                                        \
    QUAL float prefix##5[32] = PYADAQ_KVT_LEVELS_5;                                        \
    QUAL float prefix##6[64] = PYADAQ_KVT_LEVELS_6;                                        \
    QUAL float prefix##7[128] = PYADAQ_KVT_LEVELS_7;

PYADAQ_KVT_LEVEL_TABLES(static const, pyadaq_kvt_host_levels_)
static const float pyadaq_kvt_host_mantissas[PYADAQ_KVT_SCALE_STEPS] = PYADAQ_KVT_SCALE_MANTISSAS;
#if defined(__CUDACC__)
PYADAQ_KVT_LEVEL_TABLES(static __constant__, pyadaq_kvt_dev_levels_)
static __constant__ float pyadaq_kvt_dev_mantissas[PYADAQ_KVT_SCALE_STEPS] = PYADAQ_KVT_SCALE_MANTISSAS;
#endif

// The reference's kvt_scale: d of code e, the mantissa times a power of two built from its bits.
PYADAQ_HD float pyadaq_kvt_scale(int e) {
    if (e == 0) {
        return 0.0f;
    }
    const uint32_t bits = (uint32_t) (e / PYADAQ_KVT_SCALE_STEPS - PYADAQ_KVT_SCALE_BIAS / PYADAQ_KVT_SCALE_STEPS + 127) << 23;
#if defined(__CUDA_ARCH__)
    return pyadaq_fmul(pyadaq_kvt_dev_mantissas[e % PYADAQ_KVT_SCALE_STEPS], __uint_as_float(bits));
#else
    float p;
    memcpy(&p, &bits, sizeof(p));
    return pyadaq_kvt_host_mantissas[e % PYADAQ_KVT_SCALE_STEPS] * p;
#endif
}

// The reference's kvt_scale_code: the largest code of 1..255 whose scale is at most rms (1 if none).
PYADAQ_HD int pyadaq_kvt_scale_code(float rms) {
    int lo = 1;
    int hi = 255;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (pyadaq_kvt_scale(mid) <= rms) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Level i of width w (1..7).
PYADAQ_HD float pyadaq_kvt_level(int w, int i) {
#if defined(__CUDA_ARCH__)
#    define PYADAQ_KVT_T(n) pyadaq_kvt_dev_levels_##n
#else
#    define PYADAQ_KVT_T(n) pyadaq_kvt_host_levels_##n
#endif
    switch (w) {
        case 1: return PYADAQ_KVT_T(1)[i];
        case 2: return PYADAQ_KVT_T(2)[i];
        case 3: return PYADAQ_KVT_T(3)[i];
        case 4: return PYADAQ_KVT_T(4)[i];
        case 5: return PYADAQ_KVT_T(5)[i];
        case 6: return PYADAQ_KVT_T(6)[i];
        default: return PYADAQ_KVT_T(7)[i];
    }
#undef PYADAQ_KVT_T
}

// The profile of each type, by ggml type id (the row types' too: the profile of their sub-blocks):
// the width of group g and where its planes start.
template <int ID> PYADAQ_HD constexpr int pyadaq_kvt_width(int g);
#define PYADAQ_KVT_WIDTH_OF(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7)                        \
    template <> PYADAQ_HD constexpr int pyadaq_kvt_width<id>(int g) {                                 \
        return g == 0 ? W0 : g == 1 ? W1 : g == 2 ? W2 : g == 3 ? W3 : g == 4 ? W4 : g == 5 ? W5      \
             : g == 6 ? W6 : W7;                                                                     \
    }
PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_WIDTH_OF)
#undef PYADAQ_KVT_WIDTH_OF

template <int ID> PYADAQ_HD constexpr int pyadaq_kvt_offset(int g) {
    return g == 0 ? 0 : pyadaq_kvt_offset<ID>(g - 1) + pyadaq_kvt_width<ID>(g - 1);
}

template <int ID> struct pyadaq_kvt_block;
#define PYADAQ_KVT_BLOCK_OF(UPPER, lower, id, ...) \
    template <> struct pyadaq_kvt_block<id> { typedef block_##lower type; };
PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_BLOCK_OF)
#undef PYADAQ_KVT_BLOCK_OF

PYADAQ_HD float pyadaq_fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
PYADAQ_HD float pyadaq_fsqrt(float a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a); // IEEE square root even under -use_fast_math
#else
    return sqrtf(a);
#endif
}

// The reference's kvt_nearest: how many midpoints (L[i] + L[i+1]) / 2 of width w's levels v
// strictly exceeds, by binary search.
PYADAQ_HD int pyadaq_kvt_nearest(float v, int w) {
    int lo = 0;
    int hi = (1 << w) - 1;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        const float m = pyadaq_fmul(0.5f, pyadaq_fadd(pyadaq_kvt_level(w, mid), pyadaq_kvt_level(w, mid + 1)));
        if (v > m) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// The reference's kvt_prepare: the block's values with non-finite ones as 0 into xs, and the
// rms weighted by 4^W per position.
template <int ID>
PYADAQ_HD float pyadaq_kvt_prepare(const float * x, float * xs) {  // xs may be x
    float ss = 0.0f;
    float sw = 0.0f;
    for (int j = 0; j < PYADAQ_KVT_QK; ++j) {
        xs[j] = isfinite(x[j]) ? x[j] : 0.0f;
        const float wt = (float) (1 << (2 * pyadaq_kvt_width<ID>(j / PYADAQ_KVT_GROUP)));
        ss = pyadaq_fadd(ss, pyadaq_fmul(wt, pyadaq_fmul(xs[j], xs[j])));
        sw = pyadaq_fadd(sw, wt);
    }
    return ss > 0.0f ? pyadaq_fsqrt(pyadaq_fdiv(ss, sw)) : 0.0f;
}

// The reference's kvt_trial_code: trial t's scale code around e_rms.
PYADAQ_HD int pyadaq_kvt_trial_code(int e_rms, int t) {
    const int et = e_rms - PYADAQ_KVT_SEARCH_BELOW + t;
    return et < 1 ? 1 : et > 255 ? 255 : et;
}

// The weighted squared error of the block xs with scale code e (one trial of kvt_search).
template <int ID>
PYADAQ_HD float pyadaq_kvt_trial_error(const float * __restrict__ xs, int e) {
    const float ds = pyadaq_kvt_scale(e);
    const float inv = pyadaq_fdiv(1.0f, ds);
    float err = 0.0f;
    for (int j = 0; j < PYADAQ_KVT_QK; ++j) {
        const int w = pyadaq_kvt_width<ID>(j / PYADAQ_KVT_GROUP);
        const float wt = (float) (1 << (2 * w));
        float v = xs[j];
        if (w > 0) {
            const int i = pyadaq_kvt_nearest(pyadaq_fmul(xs[j], inv), w);
            v = pyadaq_fsub(xs[j], pyadaq_fmul(ds, pyadaq_kvt_level(w, i)));
        }
        err = pyadaq_fadd(err, pyadaq_fmul(wt, pyadaq_fmul(v, v)));
    }
    return err;
}

template <int ID>
PYADAQ_HD void pyadaq_kvt_quantize_block(const float * __restrict__ x, typename pyadaq_kvt_block<ID>::type * __restrict__ y) {
    float xs[PYADAQ_KVT_QK];
    const float rms = pyadaq_kvt_prepare<ID>(x, xs);
    int code = 0;
    if (rms > 0.0f) {
        const int e_rms = pyadaq_kvt_scale_code(rms);
        float best_err = INFINITY;
        int best = e_rms;
        for (int t = 0; t < PYADAQ_KVT_SEARCH_N; ++t) {
            const int e = pyadaq_kvt_trial_code(e_rms, t);
            const float err = pyadaq_kvt_trial_error<ID>(xs, e);
            if (err < best_err) {
                best_err = err;
                best = e;
            }
        }
        code = best;
    }
    y->e = (uint8_t) code;
    const float dd = pyadaq_kvt_scale(code);
    const float inv = dd > 0.0f ? pyadaq_fdiv(1.0f, dd) : 0.0f;
    uint8_t * q = y->q;
    for (int g = 0; g < 8; ++g) {
        const int w = pyadaq_kvt_width<ID>(g);
        int idx[PYADAQ_KVT_GROUP];
        for (int i = 0; i < PYADAQ_KVT_GROUP; ++i) {
            idx[i] = (w > 0 && dd > 0.0f) ? pyadaq_kvt_nearest(pyadaq_fmul(xs[g * PYADAQ_KVT_GROUP + i], inv), w) : 0;
        }
        for (int k = 0; k < w; ++k) {
            uint8_t byte = 0;
            for (int i = 0; i < PYADAQ_KVT_GROUP; ++i) {
                byte |= (uint8_t) (((idx[i] >> k) & 1) << i);
            }
            *q++ = byte;
        }
    }
}

// The level index of value j of a block.
template <int ID>
PYADAQ_HD int pyadaq_kvt_index(const typename pyadaq_kvt_block<ID>::type * b, int j) {
    const int g = j / PYADAQ_KVT_GROUP;
    const int i = j % PYADAQ_KVT_GROUP;
    const uint8_t * q = b->q + pyadaq_kvt_offset<ID>(g);
    int idx = 0;
    for (int k = 0; k < pyadaq_kvt_width<ID>(g); ++k) {
        idx |= ((q[k] >> i) & 1) << k;
    }
    return idx;
}

// Value j of a block without its scale: the level (0 for a group of width 0).
template <int ID>
PYADAQ_HD float pyadaq_kvt_unscaled(const typename pyadaq_kvt_block<ID>::type * b, int j) {
    const int w = pyadaq_kvt_width<ID>(j / PYADAQ_KVT_GROUP);
    return w > 0 ? pyadaq_kvt_level(w, pyadaq_kvt_index<ID>(b, j)) : 0.0f;
}

// Values j and j+1 of a block (j even) as floats: d * level, the reference's product (0 itself
// for a group of width 0).
template <int ID>
PYADAQ_HD void pyadaq_kvt_dequant2(const typename pyadaq_kvt_block<ID>::type * b, int j, float * v0, float * v1) {
    const float d = pyadaq_kvt_scale(b->e);
    const bool zero = pyadaq_kvt_width<ID>(j / PYADAQ_KVT_GROUP) == 0;
    *v0 = zero ? 0.0f : pyadaq_fmul(d, pyadaq_kvt_unscaled<ID>(b, j));
    *v1 = zero ? 0.0f : pyadaq_fmul(d, pyadaq_kvt_unscaled<ID>(b, j + 1));
}
