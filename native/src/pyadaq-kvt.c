// Scalar reference of pyadaq's transform-coded KV-cache types (kvt2, kvt3, kvt4 and their
// steep variants): this file is the specification, compiled with -ffp-contract=off; the numpy
// twin (pyadaq/quants_ref.py) repeats its float operations in the same order.
//
// These types store values that a calibrated context has put in whitened principal coordinates,
// interleaved so that position p of every 64-value block holds components of the same variance
// rank (pyadaq/runtime/kv_transform.py): every value has unit variance, and the early positions
// matter more than the late ones. A block is a one-byte scale code e and 8 groups of 8 values; the
// values of group g get PROFILE[g] bits (0..7), an index into the Lloyd-Max levels of a unit
// Gaussian for that width, and decode as d * levels[index] (a width of 0 decodes as 0), where
// d = 2^((e - 128) / 8) (0 for e = 0). Whitened values have a block rms near 1, so 8 bits of scale
// (a factor of 1.09 per code, 2^-15.9 to 2^15.9) lose nothing against fp16 in that range (outside
// it the codes clamp), and the 8 bits saved give one group of the profile one bit more.

#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml-impl.h"
#include "ggml.h"

#include "pyadaq-kvt-levels.h"
#include "pyadaq-kvt-trellis.h"
#include "pyadaq-quants.h"

#include <assert.h>
#include <math.h>
#include <string.h>

// the levels (pyadaq-kvt-levels.h)
static const float kvt_levels_1[2] = PYADAQ_KVT_LEVELS_1;
static const float kvt_levels_2[4] = PYADAQ_KVT_LEVELS_2;
static const float kvt_levels_3[8] = PYADAQ_KVT_LEVELS_3;
static const float kvt_levels_4[16] = PYADAQ_KVT_LEVELS_4;
static const float kvt_levels_5[32] = PYADAQ_KVT_LEVELS_5;
static const float kvt_levels_6[64] = PYADAQ_KVT_LEVELS_6;
static const float kvt_levels_7[128] = PYADAQ_KVT_LEVELS_7;

static const float * const kvt_levels[8] = { NULL, kvt_levels_1, kvt_levels_2, kvt_levels_3,
                                             kvt_levels_4, kvt_levels_5, kvt_levels_6, kvt_levels_7 };

// the scale codes (pyadaq-quants.h): a mantissa per step of an octave times a power of two
static const float kvt_scale_mantissas[PYADAQ_KVT_SCALE_STEPS] = PYADAQ_KVT_SCALE_MANTISSAS;
static_assert(PYADAQ_KVT_SCALE_BIAS % PYADAQ_KVT_SCALE_STEPS == 0, "scale 1 starts an octave");
static_assert(255 / PYADAQ_KVT_SCALE_STEPS - PYADAQ_KVT_SCALE_BIAS / PYADAQ_KVT_SCALE_STEPS < 127 &&
              1 / PYADAQ_KVT_SCALE_STEPS - PYADAQ_KVT_SCALE_BIAS / PYADAQ_KVT_SCALE_STEPS > -126,
              "every scale is a normal float");

// d of code e: the mantissa times 2^(e / STEPS - BIAS / STEPS), built from its exponent bits
static inline float kvt_scale(int e) {
    if (e == 0) {
        return 0.0f;
    }
    const uint32_t bits = (uint32_t) (e / PYADAQ_KVT_SCALE_STEPS - PYADAQ_KVT_SCALE_BIAS / PYADAQ_KVT_SCALE_STEPS + 127) << 23;
    float p;
    memcpy(&p, &bits, sizeof(p));
    return kvt_scale_mantissas[e % PYADAQ_KVT_SCALE_STEPS] * p;
}

// the largest code of 1..255 whose scale is at most rms (1 if none), by binary search
static inline int kvt_scale_code(float rms) {
    int lo = 1;
    int hi = 255;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (kvt_scale(mid) <= rms) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// trial t's code
static inline int kvt_trial_code(int e_rms, int t) {
    const int e = e_rms - PYADAQ_KVT_SEARCH_BELOW + t;
    return e < 1 ? 1 : e > 255 ? 255 : e;
}

int pyadaq_kvt_scale(int e, float * out) {
    if (e < 0 || e > 255) {
        return -1;
    }
    *out = kvt_scale(e);
    return 0;
}

#define PYADAQ_KVT_CHECK(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7)                               \
    static_assert(GGML_TYPE_##UPPER == (id), "ggml.h patch and PYADAQ_KVT_TYPES disagree on " #lower);  \
    static_assert(sizeof(block_##lower) == PYADAQ_KVT_SIZE(W0, W1, W2, W3, W4, W5, W6, W7),             \
                  "wrong " #lower " block size/padding");                                               \
    static_assert((W0) >= (W1) && (W1) >= (W2) && (W2) >= (W3) && (W3) >= (W4) && (W4) >= (W5) &&       \
                  (W5) >= (W6) && (W6) >= (W7) && (W0) <= PYADAQ_KVT_MAX_BITS && (W7) >= 0,            \
                  #lower ": a profile descends from at most 7 bits");
PYADAQ_KVT_TYPES(PYADAQ_KVT_CHECK)
static_assert(PYADAQ_KVT_QK == 8 * PYADAQ_KVT_GROUP, "a block is 8 groups");

int pyadaq_kvt_levels(int bits, float * out, int n) {
    if (bits < 1 || bits > PYADAQ_KVT_MAX_BITS || n < (1 << bits)) {
        return -1;
    }
    memcpy(out, kvt_levels[bits], sizeof(float) * (size_t) (1 << bits));
    return 1 << bits;
}

// the midpoints between consecutive levels of every width: mids[w][i] = (L[i] + L[i+1]) / 2
typedef struct { float m[PYADAQ_KVT_MAX_BITS + 1][1 << PYADAQ_KVT_MAX_BITS]; } kvt_mids;

static void kvt_make_mids(kvt_mids * mids) {
    for (int w = 1; w <= PYADAQ_KVT_MAX_BITS; ++w) {
        const float * L = kvt_levels[w];
        for (int i = 0; i + 1 < (1 << w); ++i) {
            mids->m[w][i] = 0.5f * (L[i] + L[i + 1]);
        }
    }
}

// the number of midpoints that v strictly exceeds (NaN: none)
static inline int kvt_nearest(float v, const float * mids, int n_mids) {
    int lo = 0, hi = n_mids;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (v > mids[mid]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// A block's inputs as the search sees them (non-finite values as 0) and their weights: a position's
// error counts 4^W times: under the profile's allocation, a direction given one bit more carries
// four times the variance, and so four times the weight in model coordinates. Returns the
// weighted rms (0: nothing to scale).
static float kvt_prepare(const float * x, const int * widths, float * xs, float * wt) {
    float ss = 0.0f;
    float sw = 0.0f;
    for (int j = 0; j < PYADAQ_KVT_QK; ++j) {
        xs[j] = isfinite(x[j]) ? x[j] : 0.0f;
        wt[j] = (float) (1 << (2 * widths[j / PYADAQ_KVT_GROUP]));
        ss += wt[j] * (xs[j] * xs[j]);
        sw += wt[j];
    }
    return ss > 0.0f ? sqrtf(ss / sw) : 0.0f;
}

// the scalar search: the trial code with the least weighted squared error (the first on ties;
// e_rms when no error is below infinity)
static int kvt_search(const float * xs, const float * wt, const int * widths, const kvt_mids * mids, float rms) {
    const int e_rms = kvt_scale_code(rms);
    float best_err = INFINITY;
    int best = e_rms;
    for (int t = 0; t < PYADAQ_KVT_SEARCH_N; ++t) {
        const int code = kvt_trial_code(e_rms, t);
        const float ds = kvt_scale(code);
        const float inv = 1.0f / ds;
        float err = 0.0f;
        for (int j = 0; j < PYADAQ_KVT_QK; ++j) {
            const int w = widths[j / PYADAQ_KVT_GROUP];
            float e = xs[j];
            if (w > 0) {
                const int i = kvt_nearest(xs[j] * inv, mids->m[w], (1 << w) - 1);
                e = xs[j] - ds * kvt_levels[w][i];
            }
            err += wt[j] * (e * e);
        }
        if (err < best_err) {
            best_err = err;
            best = code;
        }
    }
    return best;
}

// the block's bytes for scale code e: e, then per group its bit planes
static void kvt_encode(const float * xs, int e, const int * widths, const kvt_mids * mids, uint8_t * out) {
    out[0] = (uint8_t) e;
    const float dd = kvt_scale(e);
    const float inv = dd > 0.0f ? 1.0f / dd : 0.0f;
    uint8_t * q = out + 1;
    for (int g = 0; g < 8; ++g) {
        const int w = widths[g];
        int idx[PYADAQ_KVT_GROUP];
        for (int i = 0; i < PYADAQ_KVT_GROUP; ++i) {
            const int j = g * PYADAQ_KVT_GROUP + i;
            idx[i] = (w > 0 && dd > 0.0f) ? kvt_nearest(xs[j] * inv, mids->m[w], (1 << w) - 1) : 0;
        }
        // bit plane k of the group: bit i is bit k of value i's index
        for (int k = 0; k < w; ++k) {
            uint8_t byte = 0;
            for (int i = 0; i < PYADAQ_KVT_GROUP; ++i) {
                byte |= (uint8_t) (((idx[i] >> k) & 1) << i);
            }
            *q++ = byte;
        }
    }
}

static void pyadaq_kvt_quantize_block(const float * x, uint8_t * out, const int * widths, const kvt_mids * mids) {
    float xs[PYADAQ_KVT_QK];
    float wt[PYADAQ_KVT_QK];
    const float rms = kvt_prepare(x, widths, xs, wt);
    kvt_encode(xs, rms > 0.0f ? kvt_search(xs, wt, widths, mids, rms) : 0, widths, mids, out);
}

static void kvt_dequantize_block(const uint8_t * in, float * y, const int * widths) {
    const float d = kvt_scale(in[0]);
    const uint8_t * q = in + 1;
    for (int g = 0; g < 8; ++g) {
        const int w = widths[g];
        for (int i = 0; i < PYADAQ_KVT_GROUP; ++i) {
            int idx = 0;
            for (int k = 0; k < w; ++k) {
                idx |= ((q[k] >> i) & 1) << k;
            }
            y[g * PYADAQ_KVT_GROUP + i] = w > 0 ? d * kvt_levels[w][idx] : 0.0f;
        }
        q += w;
    }
}

// The AVX2 dequantization (chosen at run time: ggml-base is built for the baseline ISA). Per group
// of 8 values, each bit plane spreads to one bit per byte (kvt_spread: byte i of kvt_spread[b] is
// bit i of b), so the 8 level indices are sum_k spread[plane k] << k; the levels of up to 5 bits
// are then looked up with permutes of 8-level tables (blended on the higher index bits), those of
// 6 and 7 bits gathered, and each is multiplied by d: the same single product d * level as the
// reference's.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define PYADAQ_KVT_HAVE_AVX2 1

#define KVT_S1(b) ((((uint64_t) (b) >> 0) & 1) | ((((uint64_t) (b) >> 1) & 1) << 8) |      \
                   ((((uint64_t) (b) >> 2) & 1) << 16) | ((((uint64_t) (b) >> 3) & 1) << 24) | \
                   ((((uint64_t) (b) >> 4) & 1) << 32) | ((((uint64_t) (b) >> 5) & 1) << 40) | \
                   ((((uint64_t) (b) >> 6) & 1) << 48) | ((((uint64_t) (b) >> 7) & 1) << 56))
#define KVT_S4(b)   KVT_S1(b), KVT_S1((b) + 1), KVT_S1((b) + 2), KVT_S1((b) + 3)
#define KVT_S16(b)  KVT_S4(b), KVT_S4((b) + 4), KVT_S4((b) + 8), KVT_S4((b) + 12)
#define KVT_S64(b)  KVT_S16(b), KVT_S16((b) + 16), KVT_S16((b) + 32), KVT_S16((b) + 48)
static const uint64_t kvt_spread[256] = { KVT_S64(0), KVT_S64(64), KVT_S64(128), KVT_S64(192) };
static_assert(sizeof(kvt_spread) == 256 * sizeof(uint64_t), "one spread per byte value");

// the levels of the widths up to 5 bits, each padded with zeros to 32: octet j of width w (levels
// j * 8 .. j * 8 + 7, as a register) is kvt_levels_padded[w] + 8 * j. A constant table, so that a
// call for one block (the K.Q dot product dequantizes block by block) builds nothing.
static const float kvt_levels_padded[6][32] = {
    { 0 }, PYADAQ_KVT_LEVELS_1, PYADAQ_KVT_LEVELS_2, PYADAQ_KVT_LEVELS_3, PYADAQ_KVT_LEVELS_4, PYADAQ_KVT_LEVELS_5,
};

// The levels of one group of width w (1..7) at the 8 indices idx: a permute of one register for
// up to 3 bits, two or four blended for 4 and 5, a gather for 6 and 7.
__attribute__((target("avx2"), always_inline))
static inline __m256 kvt_lookup8(int w, __m256i idx) {
    const float * t = kvt_levels_padded[w <= 5 ? w : 0];
    if (w <= 3) {
        return _mm256_permutevar8x32_ps(_mm256_loadu_ps(t), idx);
    }
    if (w <= 5) {
        // index bit 3 picks the octet within a pair, bit 4 the pair
        const __m256 hi3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        __m256 lv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t), idx),
                                     _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8), idx), hi3);
        if (w == 5) {
            const __m256 up = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 16), idx),
                                               _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 24), idx), hi3);
            lv = _mm256_blendv_ps(lv, up, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)));
        }
        return lv;
    }
    return _mm256_i32gather_ps(kvt_levels[w], idx, 4);
}

// Inlined into one function per type with that type's constant profile, so that the loops over
// groups and planes unroll and every width is known where it is used (with the profile read at
// run time the same work took three times as long: 100 against 33 ns per 256-value row of kvt2).
__attribute__((target("avx2"), always_inline))
static inline void kvt_dequantize_row_avx2(const uint8_t * x, size_t block_bytes, float * y, int64_t k, const int * widths) {
    for (int64_t b = 0; b < k / PYADAQ_KVT_QK; ++b) {
        const uint8_t * in = x + (size_t) b * block_bytes;
        const __m256 d = _mm256_set1_ps(kvt_scale(in[0]));
        const uint8_t * q = in + 1;
        float * yb = y + b * PYADAQ_KVT_QK;
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
            const int w = widths[g];
            uint64_t packed = 0;
#pragma GCC unroll 8
            for (int kk = 0; kk < w; ++kk) {
                packed |= kvt_spread[q[kk]] << kk;
            }
            q += w;
            if (w == 0) {  // 0 itself, as in the reference
                _mm256_storeu_ps(yb + g * PYADAQ_KVT_GROUP, _mm256_setzero_ps());
                continue;
            }
            const __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long) packed));
            _mm256_storeu_ps(yb + g * PYADAQ_KVT_GROUP, _mm256_mul_ps(d, kvt_lookup8(w, idx)));
        }
    }
}

// The index of the nearest level of 8 values at once (the number of midpoints each strictly
// exceeds, as kvt_nearest): by counting for up to 4 bits, by a branchless binary search of the
// 2^w - 1 sorted midpoints (gathered) above.
__attribute__((target("avx2")))
static inline __m256i kvt_nearest8(__m256 v, const float * mids, int w) {
    __m256i i = _mm256_setzero_si256();
    if (w <= 4) {
        for (int m = 0; m < (1 << w) - 1; ++m) {
            i = _mm256_sub_epi32(i, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(mids[m]), _CMP_GT_OQ)));
        }
        return i;
    }
    for (int step = 1 << (w - 1); step >= 1; step >>= 1) {
        const __m256i probe = _mm256_add_epi32(i, _mm256_set1_epi32(step - 1));
        const __m256 m = _mm256_i32gather_ps(mids, probe, 4);
        const __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(v, m, _CMP_GT_OQ));
        i = _mm256_add_epi32(i, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
    }
    return i;
}

// kvt_search with 8 trials in the lanes of a register: each lane repeats the scalar search's float
// operations for its trial in the same order (no fused multiply-add: this file is compiled with
// -ffp-contract=off and the target has none), and the trials are compared in the same order, so
// the scale found, and the block's bytes, are the reference's.
__attribute__((target("avx2")))
static int kvt_search_avx2(const float * xs, const float * wt, const int * widths, const kvt_mids * mids, float rms) {
    static_assert(PYADAQ_KVT_SEARCH_N % 8 == 0, "the trials fill whole registers");
    const int e_rms = kvt_scale_code(rms);
    float errs[PYADAQ_KVT_SEARCH_N];
    float scales[PYADAQ_KVT_SEARCH_N];
    for (int t = 0; t < PYADAQ_KVT_SEARCH_N; ++t) {
        scales[t] = kvt_scale(kvt_trial_code(e_rms, t));
    }
    for (int t0 = 0; t0 < PYADAQ_KVT_SEARCH_N; t0 += 8) {
        const __m256 ds = _mm256_loadu_ps(scales + t0);
        const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), ds);
        __m256 err = _mm256_setzero_ps();
        for (int j = 0; j < PYADAQ_KVT_QK; ++j) {
            const int w = widths[j / PYADAQ_KVT_GROUP];
            const __m256 xv = _mm256_set1_ps(xs[j]);
            __m256 e = xv;
            if (w > 0) {
                const __m256i i = kvt_nearest8(_mm256_mul_ps(xv, inv), mids->m[w], w);
                e = _mm256_sub_ps(xv, _mm256_mul_ps(ds, _mm256_i32gather_ps(kvt_levels[w], i, 4)));
            }
            err = _mm256_add_ps(err, _mm256_mul_ps(_mm256_set1_ps(wt[j]), _mm256_mul_ps(e, e)));
        }
        _mm256_storeu_ps(errs + t0, err);
    }
    float best_err = INFINITY;
    int best = e_rms;
    for (int t = 0; t < PYADAQ_KVT_SEARCH_N; ++t) {
        if (errs[t] < best_err) {
            best_err = errs[t];
            best = kvt_trial_code(e_rms, t);
        }
    }
    return best;
}

// kvt_encode for a group of 8 values at a time: the same product x * inv and the same nearest
// index (kvt_nearest8), and bit plane k of the group is the sign bits of the indices shifted left
// by 31 - k, which movemask packs with lane i at bit i, as the reference packs value i.
__attribute__((target("avx2")))
static void kvt_encode_avx2(const float * xs, int e, const int * widths, const kvt_mids * mids, uint8_t * out) {
    out[0] = (uint8_t) e;
    const float dd = kvt_scale(e);
    const __m256 inv = _mm256_set1_ps(dd > 0.0f ? 1.0f / dd : 0.0f);
    uint8_t * q = out + 1;
    for (int g = 0; g < 8; ++g) {
        const int w = widths[g];
        if (w == 0) {
            continue;
        }
        const __m256i idx = dd > 0.0f ? kvt_nearest8(_mm256_mul_ps(_mm256_loadu_ps(xs + g * PYADAQ_KVT_GROUP), inv),
                                                     mids->m[w], w)
                                      : _mm256_setzero_si256();
        for (int k = 0; k < w; ++k) {
            *q++ = (uint8_t) _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - k)));
        }
    }
}

__attribute__((target("avx2")))
static void pyadaq_kvt_quantize_block_avx2(const float * x, uint8_t * out, const int * widths, const kvt_mids * mids) {
    static_assert(PYADAQ_KVT_GROUP == 8, "a group is one register of 8 lanes");
    float xs[PYADAQ_KVT_QK];
    float wt[PYADAQ_KVT_QK];
    const float rms = kvt_prepare(x, widths, xs, wt);
    kvt_encode_avx2(xs, rms > 0.0f ? kvt_search_avx2(xs, wt, widths, mids, rms) : 0, widths, mids, out);
}
#endif

#ifdef PYADAQ_KVT_HAVE_AVX2
#define PYADAQ_KVT_AVX2_DEQUANT(lower)                                                                   \
    __attribute__((target("avx2")))                                                                      \
    static void dequantize_row_##lower##_avx2(const void * x, float * y, int64_t k) {                    \
        kvt_dequantize_row_avx2((const uint8_t *) x, sizeof(block_##lower), y, k, lower##_widths);       \
    }
#define PYADAQ_KVT_AVX2_CASE(lower)                                                                      \
    if (impl == PYADAQ_IMPL_AVX2 && pyadaq_cpu_has_avx2()) {                                             \
        dequantize_row_##lower##_avx2(x, y, k);                                                          \
        return 0;                                                                                        \
    }
#define PYADAQ_KVT_QUANTIZE_AVX2_CASE(lower)                                                             \
    if (impl == PYADAQ_IMPL_AVX2 && pyadaq_cpu_has_avx2()) {                                             \
        for (int64_t i = 0; i < k / PYADAQ_KVT_QK; ++i) {                                                \
            pyadaq_kvt_quantize_block_avx2(x + i * PYADAQ_KVT_QK, (uint8_t *) &b[i], lower##_widths, &mids); \
        }                                                                                                \
        return 0;                                                                                        \
    }
#else
#define PYADAQ_KVT_AVX2_DEQUANT(lower)
#define PYADAQ_KVT_AVX2_CASE(lower)
#define PYADAQ_KVT_QUANTIZE_AVX2_CASE(lower)
#endif

// The entries every transform-coded type has beside its own quantize/dequantize: the registered
// to_float (the best implementation) and ggml_quantize_chunk's work (the reference).
#define PYADAQ_KVT_ENTRIES(UPPER, lower, QK)                                                             \
    void dequantize_row_##lower(const void * x, float * y, int64_t k) {                                  \
        assert(k % (QK) == 0);                                                                           \
        dequantize_row_##lower##_impl(x, y, k, pyadaq_dequant_best());                                   \
    }                                                                                                    \
    size_t quantize_##lower(const float * src, void * dst, int64_t nrows, int64_t n_per_row,             \
                            const float * imatrix) {                                                     \
        (void) imatrix;                                                                                  \
        return pyadaq_quantize_rows(GGML_TYPE_##UPPER, quantize_row_##lower##_ref, src, dst, nrows, n_per_row); \
    }

#define PYADAQ_KVT_DEFINE(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7)                              \
    static const int lower##_widths[8] = { W0, W1, W2, W3, W4, W5, W6, W7 };                              \
    PYADAQ_KVT_AVX2_DEQUANT(lower)                                                                       \
    void quantize_row_##lower##_ref(const float * x, void * y, int64_t k) {                              \
        assert(k % PYADAQ_KVT_QK == 0);                                                                   \
        kvt_mids mids;                                                                                   \
        kvt_make_mids(&mids);                                                                            \
        block_##lower * b = (block_##lower *) y;                                                         \
        for (int64_t i = 0; i < k / PYADAQ_KVT_QK; ++i) {                                                \
            pyadaq_kvt_quantize_block(x + i * PYADAQ_KVT_QK, (uint8_t *) &b[i], lower##_widths, &mids);  \
        }                                                                                                \
    }                                                                                                    \
    void dequantize_row_##lower##_ref(const void * x, float * y, int64_t k) {                            \
        assert(k % PYADAQ_KVT_QK == 0);                                                                   \
        const block_##lower * b = (const block_##lower *) x;                                             \
        for (int64_t i = 0; i < k / PYADAQ_KVT_QK; ++i) {                                                \
            kvt_dequantize_block((const uint8_t *) &b[i], y + i * PYADAQ_KVT_QK, lower##_widths);        \
        }                                                                                                \
    }                                                                                                    \
    static int quantize_row_##lower##_impl(const float * x, void * y, int64_t k, int impl) {             \
        kvt_mids mids;                                                                                   \
        kvt_make_mids(&mids);                                                                            \
        block_##lower * b = (block_##lower *) y;                                                         \
        PYADAQ_KVT_QUANTIZE_AVX2_CASE(lower)                                                             \
        if (impl != PYADAQ_IMPL_SCALAR) {                                                                \
            return -2;                                                                                   \
        }                                                                                                \
        for (int64_t i = 0; i < k / PYADAQ_KVT_QK; ++i) {                                                \
            pyadaq_kvt_quantize_block(x + i * PYADAQ_KVT_QK, (uint8_t *) &b[i], lower##_widths, &mids);  \
        }                                                                                                \
        return 0;                                                                                        \
    }                                                                                                    \
    static int dequantize_row_##lower##_impl(const void * x, float * y, int64_t k, int impl) {           \
        if (impl == PYADAQ_IMPL_SCALAR) {                                                                \
            dequantize_row_##lower##_ref(x, y, k);                                                       \
            return 0;                                                                                    \
        }                                                                                                \
        PYADAQ_KVT_AVX2_CASE(lower)                                                                      \
        return -2;                                                                                       \
    }                                                                                                    \
    PYADAQ_KVT_ENTRIES(UPPER, lower, PYADAQ_KVT_QK)
PYADAQ_KVT_TYPES(PYADAQ_KVT_DEFINE)

// ---- Row-trellis types (kvt2r, kvt3r) ----------------------------------------------------------
//
// A block is a row of 256 values: four sub-blocks of 64 with kvt's group profile, a scale code each,
// found by kvt's search (kvt_search, so the scales are a kvt block's), and one bit stream per width
// of the profile, from the widest down, each holding that width's values in row order (sub-block,
// then group, then position). Stream k holds n_k = 32 * (groups of width k) values, k bits each,
// value t's at bits t*k .. t*k+k-1 (little-endian bit order: bit i of the payload is bit i % 8 of
// byte i / 8); n_k * k is a multiple of 32, so every stream starts on a byte.
//
// Widths above PYADAQ_KVTR_MAX_TRELLIS hold the index of the Lloyd-Max level nearest to u = x / d
// (kvt's levels; the value decodes as d * levels[index]). Narrower widths are a tail-biting
// bitshift trellis: value t decodes as d * table_k[W], where the window W is the stream's S bits
// before value t's own and its k bits (S = PYADAQ_KVTR_STATE_BITS; W's low S bits are the earlier
// ones), the stream read circularly (value 0's S bits are the stream's last S). The encoder picks
// the stream by Viterbi over the 2^S states (the last S bits), minimising sum d^2 (u - table_k[W])^2:
//   pass 1 from every state at cost 0; s0 = the first state of least final cost;
//   pass 2 from s0 alone (the others at +inf), read back from s0 (the stream ends where it began).
// Each step, for every next state s' in order, the candidates W = (s' << k) | r for r = 0..2^k - 1
// in order, cost c = cost[W & (2^S - 1)] + w * ((u - table_k[W]) * (u - table_k[W])) in float32;
// the first least c is kept (a next state with no finite candidate keeps W = s' << k and +inf).

static_assert(PYADAQ_KVTR_STATE_BITS >= 1 && PYADAQ_KVTR_STATE_BITS <= 8, "a state fits the windows' uint16");
static_assert(PYADAQ_KVTR_QK == 256, "a row is 256 values: 4 blocks of 64");
static_assert(PYADAQ_KVTR_MAX_TRELLIS == 3, "tables exist for widths 1..3");
static_assert(32 * 1 >= PYADAQ_KVTR_STATE_BITS, "the shortest stream (32 values of 1 bit) is longer than a state");

#define KVTR_NS (1 << PYADAQ_KVTR_STATE_BITS)
static const float kvtr_table_1[2 * KVTR_NS] = PYADAQ_KVTR_TABLE_1;
static const float kvtr_table_2[4 * KVTR_NS] = PYADAQ_KVTR_TABLE_2;
static const float kvtr_table_3[8 * KVTR_NS] = PYADAQ_KVTR_TABLE_3;
static const float * const kvtr_tables[PYADAQ_KVTR_MAX_TRELLIS + 1] = { NULL, kvtr_table_1, kvtr_table_2, kvtr_table_3 };

int pyadaq_kvtr_table(int bits, float * out, int n) {
    if (bits < 1 || bits > PYADAQ_KVTR_MAX_TRELLIS || n < (KVTR_NS << bits)) {
        return -1;
    }
    memcpy(out, kvtr_tables[bits], sizeof(float) * (size_t) (KVTR_NS << bits));
    return KVTR_NS << bits;
}

#define KVTR_MAX_STREAM PYADAQ_KVTR_QK

// The state a pass reads back from: start itself when given, else the first of least final cost.
static int kvtr_end_state(const float * cost, int start) {
    if (start >= 0) {
        return start;
    }
    int s = 0;
    for (int q = 1; q < KVTR_NS; ++q) {
        if (cost[q] < cost[s]) {
            s = q;
        }
    }
    return s;
}

// One Viterbi pass over the stream u (weights w) of width k: start < 0 starts from every state,
// else from that state alone; returns the state it reads back from (kvtr_end_state) and, unless
// wins is NULL (the first pass needs only that state), the windows read back from it. Each next
// state's candidates come in the order r = 0, 1, ... (the spec's); the loop over r is outside the
// loop over states, as in the AVX2 version below.
static int kvtr_viterbi(const float * u, const float * w, int n, int k, int start, uint16_t * wins) {
    uint16_t back[KVTR_MAX_STREAM][KVTR_NS];
    const float * T = kvtr_tables[k];
    float cost[KVTR_NS];
    float best[KVTR_NS];
    int bw[KVTR_NS];
    for (int s = 0; s < KVTR_NS; ++s) {
        cost[s] = (start < 0 || s == start) ? 0.0f : INFINITY;
    }
    for (int t = 0; t < n; ++t) {
        const float ut = u[t];
        const float wt = w[t];
        for (int s2 = 0; s2 < KVTR_NS; ++s2) {
            best[s2] = INFINITY;
            bw[s2] = s2 << k;
        }
        for (int r = 0; r < (1 << k); ++r) {
            for (int s2 = 0; s2 < KVTR_NS; ++s2) {
                const int W = (s2 << k) | r;
                const float diff = ut - T[W];
                const float c = cost[W & (KVTR_NS - 1)] + wt * (diff * diff);
                const int better = c < best[s2];
                best[s2] = better ? c : best[s2];
                bw[s2] = better ? W : bw[s2];
            }
        }
        for (int s2 = 0; s2 < KVTR_NS; ++s2) {
            cost[s2] = best[s2];
            back[t][s2] = (uint16_t) bw[s2];
        }
    }
    const int end = kvtr_end_state(cost, start);
    for (int t = n - 1, s = end; wins != NULL && t >= 0; --t) {
        wins[t] = back[t][s];
        s = back[t][s] & (KVTR_NS - 1);
    }
    return end;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
// The AVX2 Viterbi pass stores the costs in the order its loads want them: a state s's cost at
// P[(s & (R - 1)) * M + (s >> k)] (R = 2^k candidates, M = 64 / R), i.e. grouped by the low k bits r
// that a next state's candidate (s2 << k) | r appends, then by m = s >> k. The 64 next states' costs
// come out of the registers in natural order and are put in that order by an in-register transpose.
static inline int kvtr_pidx(int s, int k) {
    return (s & ((1 << k) - 1)) * (KVTR_NS >> k) + (s >> k);
}

// even and odd elements of the 16 floats a, b
__attribute__((target("avx2"), always_inline))
static inline __m256 kvtr_even(__m256 a, __m256 b) {
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
}
__attribute__((target("avx2"), always_inline))
static inline __m256 kvtr_odd(__m256 a, __m256 b) {
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}

// b[0..7]: the 64 costs in natural order -> p[0..7]: the same in kvtr_pidx order for width k
__attribute__((target("avx2"), always_inline))
static inline void kvtr_to_pidx(const __m256 * b, __m256 * p, int k) {
    if (k == 1) {  // P[r * 32 + m] = nat[2m + r]
        for (int q = 0; q < 4; ++q) {
            p[q] = kvtr_even(b[2 * q], b[2 * q + 1]);
            p[4 + q] = kvtr_odd(b[2 * q], b[2 * q + 1]);
        }
        return;
    }
    // k = 2, 3: 4x4 transposes within each 128-bit lane of b[4h .. 4h+3]: tt[4h + c] holds element c
    // of each 128-bit row, lane 0 from the rows' first halves, lane 1 from their second
    __m256 tt[8];
    for (int h = 0; h < 2; ++h) {
        const __m256 * A = b + 4 * h;
        const __m256 t0 = _mm256_unpacklo_ps(A[0], A[1]);
        const __m256 t1 = _mm256_unpackhi_ps(A[0], A[1]);
        const __m256 t2 = _mm256_unpacklo_ps(A[2], A[3]);
        const __m256 t3 = _mm256_unpackhi_ps(A[2], A[3]);
        tt[4 * h + 0] = _mm256_shuffle_ps(t0, t2, 0x44);
        tt[4 * h + 1] = _mm256_shuffle_ps(t0, t2, 0xEE);
        tt[4 * h + 2] = _mm256_shuffle_ps(t1, t3, 0x44);
        tt[4 * h + 3] = _mm256_shuffle_ps(t1, t3, 0xEE);
    }
    if (k == 2) {  // P[r * 16 + m] = nat[4m + r]: m in order within each register
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (int h = 0; h < 2; ++h) {
            for (int r = 0; r < 4; ++r) {
                p[2 * r + h] = _mm256_permutevar8x32_ps(tt[4 * h + r], order);
            }
        }
    } else {  // k == 3: P[r * 8 + m] = nat[8m + r], an 8x8 transpose
        for (int r = 0; r < 4; ++r) {
            p[r] = _mm256_permute2f128_ps(tt[r], tt[4 + r], 0x20);
            p[4 + r] = _mm256_permute2f128_ps(tt[r], tt[4 + r], 0x31);
        }
    }
}

// The end of a SIMD pass (costs of every step in kvtr_pidx order): the state to read back from
// (kvtr_end_state) and, unless wins is NULL, the windows read back from it, each step's candidates
// of the path's state computed again with the reference's operations, the first least one taken.
static int kvtr_read_back(const float (*costs)[KVTR_NS], const float * u, const float * w, int n, int k, int start,
                          uint16_t * wins) {
    const float * T = kvtr_tables[k];
    float last[KVTR_NS];
    for (int s = 0; s < KVTR_NS; ++s) {
        last[s] = costs[n][kvtr_pidx(s, k)];
    }
    const int end = kvtr_end_state(last, start);
    for (int t = n - 1, s = end; wins != NULL && t >= 0; --t) {
        float best = INFINITY;
        int W = s << k;
        for (int r = 0; r < (1 << k); ++r) {
            const float diff = u[t] - T[(s << k) | r];
            const float c = costs[t][kvtr_pidx(((s << k) | r) & (KVTR_NS - 1), k)] + w[t] * (diff * diff);
            if (c < best) {
                best = c;
                W = (s << k) | r;
            }
        }
        wins[t] = (uint16_t) W;
        s = W & (KVTR_NS - 1);
    }
    return end;
}

// kvtr_viterbi with the 64 next states in 8 registers and no gathers: a state s2's candidate for r
// reads the window W = (s2 << k) | r, i.e. table[W] (from a copy of the table ordered by r, then
// s2) and cost[W & 63], which for s2 = 8i .. 8i + 7 is a run of 8 in the costs in kvtr_pidx order:
// per lane, the reference's float operations in its order.
// The forward pass keeps only each state's least cost (a min, which is the reference's value
// whichever candidate reaches it first) and the costs of every step; reading back, the candidates
// of the one state on the path are computed again, in the reference's order and operations, and
// the first least one is taken: the reference's choice, without tracking it for every state.
// (Keeping each window's w * diff^2 from the first pass for the second made this slower here: the
// second pass then waits on reading them back.)
__attribute__((target("avx2")))
static int kvtr_viterbi_avx2(const float * u, const float * w, int n, int k, int start, uint16_t * wins) {
    static_assert(KVTR_NS == 64, "8 registers of 8 states");
    float costs[KVTR_MAX_STREAM + 1][KVTR_NS];  // 65 KiB of stack: the costs before each step, kvtr_pidx order
    const float * T = kvtr_tables[k];
    const int R = 1 << k;
    const int M = KVTR_NS >> k;
    float Tr[8 * KVTR_NS];  // Tr[r * 64 + s2] = T[(s2 << k) | r]
    for (int r = 0; r < R; ++r) {
        for (int s2 = 0; s2 < KVTR_NS; ++s2) {
            Tr[r * KVTR_NS + s2] = T[(s2 << k) | r];
        }
    }
    for (int s = 0; s < KVTR_NS; ++s) {
        costs[0][kvtr_pidx(s, k)] = (start < 0 || s == start) ? 0.0f : INFINITY;
    }
    for (int t = 0; t < n; ++t) {
        const float * P = costs[t];
        const __m256 ut = _mm256_set1_ps(u[t]);
        const __m256 wt = _mm256_set1_ps(w[t]);
        __m256 best[8];
        for (int i = 0; i < 8; ++i) {
            best[i] = _mm256_set1_ps(INFINITY);
        }
        for (int r = 0; r < R; ++r) {
            const float * Tr_r = Tr + r * KVTR_NS;
            const float * P_r = P + r * M;
#pragma GCC unroll 8
            for (int i = 0; i < 8; ++i) {
                const __m256 diff = _mm256_sub_ps(ut, _mm256_loadu_ps(Tr_r + 8 * i));
                const __m256 c = _mm256_add_ps(_mm256_loadu_ps(P_r + ((8 * i) & (M - 1))), _mm256_mul_ps(wt, _mm256_mul_ps(diff, diff)));
                best[i] = _mm256_min_ps(c, best[i]);  // c < best ? c : best, the reference's update
            }
        }
        __m256 next[8];
        kvtr_to_pidx(best, next, k);
        for (int i = 0; i < 8; ++i) {
            _mm256_storeu_ps(costs[t + 1] + 8 * i, next[i]);
        }
    }
    return kvtr_read_back(costs, u, w, n, k, start, wins);
}

// A trellis stream with the AVX2 passes (kvtr_trellis's)
__attribute__((target("avx2")))
static void kvtr_trellis_avx2(const float * u, const float * w, int n, int k, uint16_t * wins) {
    const int s0 = kvtr_viterbi_avx2(u, w, n, k, -1, NULL);
    kvtr_viterbi_avx2(u, w, n, k, s0, wins);
}
#endif

// the positions (0..255) of the values of width k, in stream order; returns their count
static int kvtr_stream_positions(const int * widths, int k, int * pos) {
    int n = 0;
    for (int b = 0; b < PYADAQ_KVTR_SUBS; ++b) {
        for (int g = 0; g < 8; ++g) {
            if (widths[g] != k) {
                continue;
            }
            for (int i = 0; i < PYADAQ_KVT_GROUP; ++i) {
                pos[n++] = b * PYADAQ_KVT_QK + g * PYADAQ_KVT_GROUP + i;
            }
        }
    }
    return n;
}

// n values of k bits each, little-endian from q's first bit on (n * k is a multiple of 8)
static void kvtr_put_stream(uint8_t * q, const uint16_t * sym, int n, int k) {
    uint32_t acc = 0;
    int nacc = 0;
    for (int t = 0; t < n; ++t) {
        acc |= (uint32_t) sym[t] << nacc;
        for (nacc += k; nacc >= 8; nacc -= 8, acc >>= 8) {
            *q++ = (uint8_t) acc;
        }
    }
}

static int kvtr_get_bits(const uint8_t * q, int bit, int len) {
    int v = 0;
    for (int i = 0; i < len; ++i, ++bit) {
        v |= ((q[bit >> 3] >> (bit & 7)) & 1) << i;
    }
    return v;
}

// A trellis stream: the first pass from every state gives the state the second starts and ends
// at; the windows of the second.
static void kvtr_trellis(const float * u, const float * w, int n, int k, uint16_t * wins) {
    const int s0 = kvtr_viterbi(u, w, n, k, -1, NULL);
    kvtr_viterbi(u, w, n, k, s0, wins);
}

// The row's payload (the streams) from its scale codes e: u = x * (1 / d) per sub-block. The streams
// fill the payload (4 * sum of the widths bytes), each byte written once.
typedef void (*kvtr_trellis_t)(const float *, const float *, int, int, uint16_t *);

static void kvtr_encode(const float * xs, const int * e, const int * widths, const kvt_mids * mids, uint8_t * q,
                        kvtr_trellis_t trellis) {
    float u[PYADAQ_KVTR_QK];
    float w[PYADAQ_KVTR_QK];
    for (int b = 0; b < PYADAQ_KVTR_SUBS; ++b) {
        const float d = kvt_scale(e[b]);
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        for (int j = b * PYADAQ_KVT_QK; j < (b + 1) * PYADAQ_KVT_QK; ++j) {
            u[j] = xs[j] * inv;
            w[j] = d * d;
        }
    }
    int bit = 0;
    for (int k = PYADAQ_KVT_MAX_BITS; k >= 1; --k) {
        int pos[KVTR_MAX_STREAM];
        const int n = kvtr_stream_positions(widths, k, pos);
        if (n == 0) {
            continue;
        }
        float su[KVTR_MAX_STREAM];
        float sw[KVTR_MAX_STREAM];
        for (int t = 0; t < n; ++t) {
            su[t] = u[pos[t]];
            sw[t] = w[pos[t]];
        }
        uint16_t sym[KVTR_MAX_STREAM];  // each value's k bits
        if (k > PYADAQ_KVTR_MAX_TRELLIS) {
            for (int t = 0; t < n; ++t) {
                sym[t] = (uint16_t) kvt_nearest(su[t], mids->m[k], (1 << k) - 1);
            }
        } else {
            trellis(su, sw, n, k, sym);
            for (int t = 0; t < n; ++t) {
                sym[t] >>= PYADAQ_KVTR_STATE_BITS;  // the window's own bits
            }
        }
        kvtr_put_stream(q + bit / 8, sym, n, k);
        bit += n * k;
    }
}

static void kvtr_quantize_row256(const float * x, uint8_t * out, const int * widths, const kvt_mids * mids,
                                 int (*search)(const float *, const float *, const int *, const kvt_mids *, float),
                                 kvtr_trellis_t trellis) {
    float xs[PYADAQ_KVTR_QK];
    float wt[PYADAQ_KVT_QK];
    int e[PYADAQ_KVTR_SUBS];
    for (int b = 0; b < PYADAQ_KVTR_SUBS; ++b) {
        float * xb = xs + b * PYADAQ_KVT_QK;
        const float rms = kvt_prepare(x + b * PYADAQ_KVT_QK, widths, xb, wt);
        e[b] = rms > 0.0f ? search(xb, wt, widths, mids, rms) : 0;
        out[b] = (uint8_t) e[b];
    }
    kvtr_encode(xs, e, widths, mids, out + PYADAQ_KVTR_SUBS, trellis);
}

// k values (whole rows) into blocks of block_bytes with the given scale search and Viterbi
static void kvtr_quantize_rows(const float * x, void * y, int64_t k, size_t block_bytes, const int * widths,
                               int (*search)(const float *, const float *, const int *, const kvt_mids *, float),
                               kvtr_trellis_t trellis) {
    kvt_mids mids;
    kvt_make_mids(&mids);
    for (int64_t i = 0; i < k / PYADAQ_KVTR_QK; ++i) {
        kvtr_quantize_row256(x + i * PYADAQ_KVTR_QK, (uint8_t *) y + i * block_bytes, widths, &mids, search, trellis);
    }
}

static void kvtr_dequantize_row256(const uint8_t * in, float * y, const int * widths) {
    const uint8_t * q = in + PYADAQ_KVTR_SUBS;
    float d[PYADAQ_KVTR_SUBS];
    for (int b = 0; b < PYADAQ_KVTR_SUBS; ++b) {
        d[b] = kvt_scale(in[b]);
    }
    for (int g = 0; g < 8; ++g) {
        if (widths[g] == 0) {
            for (int b = 0; b < PYADAQ_KVTR_SUBS; ++b) {
                memset(y + b * PYADAQ_KVT_QK + g * PYADAQ_KVT_GROUP, 0, sizeof(float) * PYADAQ_KVT_GROUP);
            }
        }
    }
    int bit = 0;
    for (int k = PYADAQ_KVT_MAX_BITS; k >= 1; --k) {
        int pos[KVTR_MAX_STREAM];
        const int n = kvtr_stream_positions(widths, k, pos);
        if (n == 0) {
            continue;
        }
        const int nbits = n * k;
        for (int t = 0; t < n; ++t) {
            const float db = d[pos[t] / PYADAQ_KVT_QK];
            if (k > PYADAQ_KVTR_MAX_TRELLIS) {
                y[pos[t]] = db * kvt_levels[k][kvtr_get_bits(q, bit + t * k, k)];
                continue;
            }
            // the window: S bits before value t's (wrapping to the stream's end) and its k bits
            const int own = kvtr_get_bits(q, bit + t * k, k);
            const int s0 = t * k - PYADAQ_KVTR_STATE_BITS;
            int state;
            if (s0 >= 0) {
                state = kvtr_get_bits(q, bit + s0, PYADAQ_KVTR_STATE_BITS);
            } else {
                state = kvtr_get_bits(q, bit + nbits + s0, -s0) | (kvtr_get_bits(q, bit, t * k) << -s0);
            }
            y[pos[t]] = db * kvtr_tables[k][(own << PYADAQ_KVTR_STATE_BITS) | state];
        }
        bit += nbits;
    }
}

#define PYADAQ_KVTR_CHECK(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7)                              \
    static_assert(GGML_TYPE_##UPPER == (id), "ggml.h patch and PYADAQ_KVTR_TYPES disagree on " #lower); \
    static_assert(sizeof(block_##lower) == PYADAQ_KVTR_SIZE(W0, W1, W2, W3, W4, W5, W6, W7),            \
                  "wrong " #lower " block size/padding");                                               \
    static_assert((W0) >= (W1) && (W1) >= (W2) && (W2) >= (W3) && (W3) >= (W4) && (W4) >= (W5) &&       \
                  (W5) >= (W6) && (W6) >= (W7) && (W0) <= PYADAQ_KVT_MAX_BITS && (W7) >= 0,            \
                  #lower ": a profile descends from at most 7 bits");
PYADAQ_KVTR_TYPES(PYADAQ_KVTR_CHECK)

#ifdef PYADAQ_KVT_HAVE_AVX2
// The AVX2 decoding of a row: each stream is copied behind its own last byte (so that a window
// that wraps reads the stream's end from the byte before it: the stream's length is a multiple
// of 32 bits) and padded, then 8 values at a time: the 64 bits from the first window's byte,
// shifted per lane to each window's first bit, masked, a table gather, times the group's d: the
// reference's d * table[W] (or d * levels[index]) for the same W.
__attribute__((target("avx2"), always_inline))
static inline void kvtr_dequantize_row256_avx2(const uint8_t * in, float * y, const int * widths) {
    const uint8_t * q = in + PYADAQ_KVTR_SUBS;
    float d[PYADAQ_KVTR_SUBS];
    for (int b = 0; b < PYADAQ_KVTR_SUBS; ++b) {
        d[b] = kvt_scale(in[b]);
    }
    for (int g = 0; g < 8; ++g) {
        if (widths[g] == 0) {
            for (int b = 0; b < PYADAQ_KVTR_SUBS; ++b) {
                _mm256_storeu_ps(y + b * PYADAQ_KVT_QK + g * PYADAQ_KVT_GROUP, _mm256_setzero_ps());
            }
        }
    }
    int byte = 0;
#pragma GCC unroll 8
    for (int k = PYADAQ_KVT_MAX_BITS; k >= 1; --k) {
        int n_groups = 0;
        for (int g = 0; g < 8; ++g) {
            n_groups += widths[g] == k;
        }
        if (n_groups == 0) {
            continue;
        }
        const int n = n_groups * PYADAQ_KVTR_SUBS * PYADAQ_KVT_GROUP;
        const int nbytes = n * k / 8;
        uint8_t ext[1 + PYADAQ_KVTR_QK * PYADAQ_KVT_MAX_BITS / 8 + 8];
        ext[0] = q[byte + nbytes - 1];
        memcpy(ext + 1, q + byte, (size_t) nbytes);
        memset(ext + 1 + nbytes, 0, 8);
        const int trellis = k <= PYADAQ_KVTR_MAX_TRELLIS;
        const int back = trellis ? PYADAQ_KVTR_STATE_BITS : 0;
        const float * table = trellis ? kvtr_tables[k] : kvt_levels[k];
        const __m256i mask = _mm256_set1_epi32((1 << (k + back)) - 1);
        const __m256i lane_bits = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(k));
        int t = 0;
#pragma GCC unroll 4
        for (int b = 0; b < PYADAQ_KVTR_SUBS; ++b) {
            const __m256 db = _mm256_set1_ps(d[b]);
#pragma GCC unroll 8
            for (int g = 0; g < 8; ++g) {
                if (widths[g] != k) {
                    continue;
                }
                // value t + lane's window starts at bit 8 + (t + lane) * k - back of ext: the 8
                // windows lie in the 64 bits from the first one's byte, shifted per lane
                const int p0 = 8 + t * k - back;
                uint64_t word;
                memcpy(&word, ext + (p0 >> 3), sizeof(word));
                const __m256i v = _mm256_set1_epi64x((long long) word);
                const __m256i sh = _mm256_add_epi32(lane_bits, _mm256_set1_epi32(p0 & 7));
                const __m256i lo = _mm256_srlv_epi64(v, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(sh)));
                const __m256i hi = _mm256_srlv_epi64(v, _mm256_cvtepu32_epi64(_mm256_extracti128_si256(sh, 1)));
                // the low halves of lo's and hi's 64-bit lanes, in lane order
                const __m256i packed = _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi),
                                                                             _MM_SHUFFLE(2, 0, 2, 0)));
                const __m256i win = _mm256_and_si256(_mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0)), mask);
                _mm256_storeu_ps(y + b * PYADAQ_KVT_QK + g * PYADAQ_KVT_GROUP, _mm256_mul_ps(db, _mm256_i32gather_ps(table, win, 4)));
                t += PYADAQ_KVT_GROUP;
            }
        }
        byte += nbytes;
    }
}
static_assert(7 + 7 * PYADAQ_KVTR_MAX_TRELLIS + PYADAQ_KVTR_STATE_BITS + PYADAQ_KVTR_MAX_TRELLIS <= 64 &&
              7 + 8 * PYADAQ_KVT_MAX_BITS <= 64, "8 consecutive windows lie in 64 bits from the first one's byte");
#endif

#ifdef PYADAQ_KVT_HAVE_AVX2
#define PYADAQ_KVTR_QUANTIZE_AVX2_CASE(lower)                                                            \
    if (impl == PYADAQ_IMPL_AVX2 && pyadaq_cpu_has_avx2()) {                                             \
        kvtr_quantize_rows(x, y, k, sizeof(block_##lower), lower##_widths, kvt_search_avx2, kvtr_trellis_avx2); \
        return 0;                                                                                        \
    }
#define PYADAQ_KVTR_DEQUANT_AVX2_CASE(lower)                                                             \
    if (impl == PYADAQ_IMPL_AVX2 && pyadaq_cpu_has_avx2()) {                                             \
        dequantize_row_##lower##_avx2(x, y, k);                                                          \
        return 0;                                                                                        \
    }
// one function per type, its profile a constant (as kvt's AVX2 dequantization)
#define PYADAQ_KVTR_AVX2_DEQUANT(lower)                                                                  \
    __attribute__((target("avx2")))                                                                      \
    static void dequantize_row_##lower##_avx2(const void * x, float * y, int64_t k) {                    \
        const block_##lower * b = (const block_##lower *) x;                                             \
        for (int64_t i = 0; i < k / PYADAQ_KVTR_QK; ++i) {                                               \
            kvtr_dequantize_row256_avx2((const uint8_t *) &b[i], y + i * PYADAQ_KVTR_QK, lower##_widths); \
        }                                                                                                \
    }
#else
#define PYADAQ_KVTR_QUANTIZE_AVX2_CASE(lower)
#define PYADAQ_KVTR_DEQUANT_AVX2_CASE(lower)
#define PYADAQ_KVTR_AVX2_DEQUANT(lower)
#endif

#define PYADAQ_KVTR_DEFINE(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7)                             \
    static const int lower##_widths[8] = { W0, W1, W2, W3, W4, W5, W6, W7 };                              \
    PYADAQ_KVTR_AVX2_DEQUANT(lower)                                                                      \
    void quantize_row_##lower##_ref(const float * x, void * y, int64_t k) {                              \
        assert(k % PYADAQ_KVTR_QK == 0);                                                                  \
        kvtr_quantize_rows(x, y, k, sizeof(block_##lower), lower##_widths, kvt_search, kvtr_trellis);     \
    }                                                                                                    \
    void dequantize_row_##lower##_ref(const void * x, float * y, int64_t k) {                            \
        assert(k % PYADAQ_KVTR_QK == 0);                                                                  \
        const block_##lower * b = (const block_##lower *) x;                                             \
        for (int64_t i = 0; i < k / PYADAQ_KVTR_QK; ++i) {                                               \
            kvtr_dequantize_row256((const uint8_t *) &b[i], y + i * PYADAQ_KVTR_QK, lower##_widths);     \
        }                                                                                                \
    }                                                                                                    \
    static int quantize_row_##lower##_impl(const float * x, void * y, int64_t k, int impl) {             \
        PYADAQ_KVTR_QUANTIZE_AVX2_CASE(lower)                                                            \
        if (impl != PYADAQ_IMPL_SCALAR) {                                                                \
            return -2;                                                                                   \
        }                                                                                                \
        quantize_row_##lower##_ref(x, y, k);                                                             \
        return 0;                                                                                        \
    }                                                                                                    \
    static int dequantize_row_##lower##_impl(const void * x, float * y, int64_t k, int impl) {           \
        if (impl == PYADAQ_IMPL_SCALAR) {                                                                \
            dequantize_row_##lower##_ref(x, y, k);                                                       \
            return 0;                                                                                    \
        }                                                                                                \
        PYADAQ_KVTR_DEQUANT_AVX2_CASE(lower)                                                             \
        return -2;                                                                                       \
    }                                                                                                    \
    PYADAQ_KVT_ENTRIES(UPPER, lower, PYADAQ_KVTR_QK)
PYADAQ_KVTR_TYPES(PYADAQ_KVTR_DEFINE)

int pyadaq_kvt_dequantize_impl(int type, const void * x, float * y, int64_t k, int impl) {
    if (impl == PYADAQ_IMPL_BEST) {
        impl = pyadaq_dequant_best();
    }
#define PYADAQ_KVT_DQ(UPPER, lower, id, ...) \
    if (type == (id)) { if (k % ggml_blck_size(GGML_TYPE_##UPPER)) return -1; return dequantize_row_##lower##_impl(x, y, k, impl); }
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_DQ)
#undef PYADAQ_KVT_DQ
    return -1;
}

int pyadaq_kvt_quantize(int type, const float * x, void * y, int64_t k, int impl) {
    if (impl == PYADAQ_IMPL_BEST) {
        impl = pyadaq_dequant_best();
    }
#define PYADAQ_KVT_QZ(UPPER, lower, id, ...) \
    if (type == (id)) { if (k % ggml_blck_size(GGML_TYPE_##UPPER)) return -1; return quantize_row_##lower##_impl(x, y, k, impl); }
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_QZ)
#undef PYADAQ_KVT_QZ
    return -1;
}
