// Scalar reference of the pyadaq KV-cache types: this file is the specification.
//
// It is compiled with -ffp-contract=off (native/cmake/pyadaq_sources.cmake) so that every
// float operation is the IEEE single-precision operation written here, in the order written
// here; pyadaq/quants_ref.py repeats them and is bit-exact with this file.

#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml-impl.h"
#include "ggml.h"

#include "pyadaq-quants.h"

#include <assert.h>
#include <math.h>
#include <string.h>

const int8_t pyadaq_levels_n2[4] = { -127, -38, 38, 127 };
const int8_t pyadaq_levels_u2[4] = { -3, -1, 1, 3 };
const int8_t pyadaq_levels_n3[8] = { -127, -79, -45, -14, 14, 45, 79, 127 };
const int8_t pyadaq_levels_u3[8] = { -7, -5, -3, -1, 1, 3, 5, 7 };

#define PYADAQ_CHECK_ID(UPPER, lower, id, QK, BITS, LEVELS, RULE)                                   \
    static_assert(GGML_TYPE_##UPPER == (id), "ggml.h patch and PYADAQ_TYPES disagree on " #lower); \
    static_assert((QK) == 32 || (QK) == 64, "pyadaq blocks hold 32 or 64 values");                \
    static_assert(sizeof(PYADAQ_BLOCK_TYPE(QK, BITS)) == PYADAQ_TYPE_SIZE(QK, BITS), "wrong " #lower " block size/padding");
PYADAQ_TYPES(PYADAQ_CHECK_ID)
static_assert(sizeof(ggml_half) == sizeof(uint16_t), "ggml_half is two bytes");
// the unused ids start right after upstream's last type; an upstream bump must move them
static_assert(GGML_TYPE_Q2_0 + 1 == PYADAQ_FIRST_UNUSED_TYPE_ID, "upstream added a type: update PYADAQ_UNUSED_TYPE_IDS");
static_assert(GGML_TYPE_COUNT == 117, "GGML_TYPE_COUNT changed: update PYADAQ_UNUSED_TYPE_IDS");

// Index of the level nearest to v: the number of midpoints between levels that v exceeds.
static inline int nearest_level(float v, const float * mids, int n_mids) {
    int idx = 0;
    for (int i = 0; i < n_mids; ++i) {
        idx += v > mids[i];
    }
    return idx;
}

float pyadaq_block_prepare(const float * x, int qk, int bits, const int8_t * levels, float * xs, float * mids) {
    const int n_levels = 1 << bits;
    float amax = 0.0f;
    for (int j = 0; j < qk; ++j) {
        xs[j] = isfinite(x[j]) ? x[j] : 0.0f;
        const float a = fabsf(xs[j]);
        if (a > amax) {
            amax = a;
        }
    }
    for (int i = 0; i + 1 < n_levels; ++i) {
        mids[i] = 0.5f * ((float) levels[i] + (float) levels[i + 1]);
    }
    return amax;
}

void pyadaq_block_pack(const uint8_t * idx, int qk, int bits, uint8_t * qs, uint8_t * qh) {
    memset(qs, 0, (size_t) qk / 4);
    if (bits == 3) {
        memset(qh, 0, (size_t) qk / 8);
    }
    for (int j = 0; j < qk; ++j) {
        const int g = j / 32;  // group of 32
        const int jj = j % 32; // position in the group
        qs[8 * g + jj % 8] |= (uint8_t) ((idx[j] & 3) << (2 * (jj / 8)));
        if (bits == 3) {
            qh[4 * g + jj / 8] |= (uint8_t) (((idx[j] >> 2) & 1) << (jj % 8));
        }
    }
}

// Quantize one block of qk values. Non-finite inputs count as 0.
static void quantize_block(const float * x, uint16_t * d_out, uint8_t * qs, uint8_t * qh,
                           int qk, int bits, const int8_t * levels, int rule) {
    const int n_levels = 1 << bits;
    const float lmax = (float) levels[n_levels - 1];

    float xs[64];
    float mids[7];
    const float amax = pyadaq_block_prepare(x, qk, bits, levels, xs, mids);

    uint8_t idx[64];
    float d = 0.0f;
    if (amax == 0.0f) {
        for (int j = 0; j < qk; ++j) {
            idx[j] = (uint8_t) (n_levels / 2);
        }
    } else if (rule == PYADAQ_SCALE_ABSMAX) {
        const float inv = lmax / amax;
        for (int j = 0; j < qk; ++j) {
            idx[j] = (uint8_t) nearest_level(xs[j] * inv, mids, n_levels - 1);
        }
        d = amax / lmax;
    } else {
        // Least squares over a range of scales: for each trial inverse scale pick the nearest
        // levels, then the d that fits those levels best; keep the trial with the least error,
        // i.e. the largest sxl^2/sll.
        const float base = lmax / amax;
        float best_score = -1.0f;
        float best_sxl = 0.0f;
        float best_sll = 1.0f;
        uint8_t trial[64];
        for (int t = 0; t < PYADAQ_SEARCH_N; ++t) {
            const float inv = base * (PYADAQ_SEARCH_LO + (float) t * PYADAQ_SEARCH_STEP);
            float sxl = 0.0f;
            float sll = 0.0f;
            for (int j = 0; j < qk; ++j) {
                const int i = nearest_level(xs[j] * inv, mids, n_levels - 1);
                const float l = (float) levels[i];
                trial[j] = (uint8_t) i;
                sxl += xs[j] * l;
                sll += l * l;
            }
            const float score = sxl * sxl / sll;
            if (score > best_score) {
                best_score = score;
                best_sxl = sxl;
                best_sll = sll;
                memcpy(idx, trial, (size_t) qk);
            }
        }
        d = best_sxl / best_sll;
    }

    *d_out = GGML_FP32_TO_FP16(d);
    pyadaq_block_pack(idx, qk, bits, qs, qh);
}

static void dequantize_block(uint16_t d16, const uint8_t * qs, const uint8_t * qh, float * y,
                             int qk, int bits, const int8_t * levels) {
    const float d = GGML_FP16_TO_FP32(d16);
    float dl[8];
    for (int i = 0; i < (1 << bits); ++i) {
        dl[i] = d * (float) levels[i];
    }
    for (int g = 0; g < qk / 32; ++g) {
        // value 32*g + 8*k + i: bits 2k..2k+1 of qs[8*g + i], bit i of qh[4*g + k]
        for (int k = 0; k < 4; ++k) {
            const uint8_t h = bits == 3 ? qh[4 * g + k] : 0;
            for (int i = 0; i < 8; ++i) {
                const int idx = ((qs[8 * g + i] >> (2 * k)) & 3) | (((h >> i) & 1) << 2);
                y[32 * g + 8 * k + i] = dl[idx];
            }
        }
    }
}

#define QH_OF(BITS, blk) PYADAQ_QH_##BITS(blk)
#define PYADAQ_QH_2(blk) NULL
#define PYADAQ_QH_3(blk) (blk).qh

// Dequantization is on the flash-attention path (every V row, once per query head), and
// ggml-base is built for the baseline ISA, so the AVX2 version is chosen at run time. It only
// looks values up in the same table of products d*level, so it gives the same floats.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define PYADAQ_HAVE_AVX2_DEQUANT 1

// table: the products d*level as floats (lanes past the 2^bits levels unused)
__attribute__((target("avx2"), always_inline))
static inline void dequantize_block_avx2(__m256 table, const uint8_t * qs, const uint8_t * qh, float * y,
                                         int qk, int bits) {
    const __m256i three = _mm256_set1_epi32(3);
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int g = 0; g < qk / 32; ++g) {
        // the 8 bytes qs[8g .. 8g+7], one per lane
        const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (qs + 8 * g)));
        for (int k = 0; k < 4; ++k) {
            __m256i idx = _mm256_and_si256(_mm256_srli_epi32(q, 2 * k), three);
            if (bits == 3) {
                const __m256i h = _mm256_set1_epi32(qh[4 * g + k]);
                idx = _mm256_or_si256(idx, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(h, lane), one), 2));
            }
            _mm256_storeu_ps(y + 32 * g + 8 * k, _mm256_permutevar8x32_ps(table, idx));
        }
    }
}

// One row: the levels are converted once per row, each block costs one multiply for its table
// (d * level, the same single-precision product as the reference's).
#define PYADAQ_DEFINE_AVX2_ROW(UPPER, lower, id, QK, BITS, LEVELS, RULE)                              \
    __attribute__((target("avx2")))                                                                  \
    static void dequantize_row_##lower##_avx2(const PYADAQ_BLOCK_TYPE(QK, BITS) * x, float * y,      \
                                              int64_t k) {                                           \
        float lf[8] = { 0 };                                                                         \
        for (int i = 0; i < (1 << (BITS)); ++i) {                                                    \
            lf[i] = (float) (LEVELS)[i];                                                             \
        }                                                                                            \
        const __m256 lev = _mm256_loadu_ps(lf);                                                      \
        for (int64_t b = 0; b < k / (QK); ++b) {                                                     \
            const __m256 table = _mm256_mul_ps(_mm256_set1_ps(GGML_FP16_TO_FP32(x[b].d)), lev);      \
            dequantize_block_avx2(table, x[b].qs, QH_OF(BITS, x[b]), y + b * (QK), QK, BITS);        \
        }                                                                                            \
    }
PYADAQ_TYPES(PYADAQ_DEFINE_AVX2_ROW)

int pyadaq_cpu_has_avx2(void) {
    static int has = -1;
    if (has < 0) {
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return has;
}
#endif

#define PYADAQ_DEFINE_REF(UPPER, lower, id, QK, BITS, LEVELS, RULE)                                  \
    void quantize_row_##lower##_ref(const float * x, void * vy, int64_t k) {                         \
        assert(k % (QK) == 0);                                                                       \
        PYADAQ_BLOCK_TYPE(QK, BITS) * y = vy;                                                        \
        for (int64_t b = 0; b < k / (QK); ++b) {                                                     \
            quantize_block(x + b * (QK), &y[b].d, y[b].qs, QH_OF(BITS, y[b]), QK, BITS, LEVELS, RULE); \
        }                                                                                            \
    }                                                                                                \
    void dequantize_row_##lower##_ref(const void * vx, float * y, int64_t k) {                      \
        assert(k % (QK) == 0);                                                                       \
        const PYADAQ_BLOCK_TYPE(QK, BITS) * x = vx;                                                  \
        for (int64_t b = 0; b < k / (QK); ++b) {                                                     \
            dequantize_block(x[b].d, x[b].qs, QH_OF(BITS, x[b]), y + b * (QK), QK, BITS, LEVELS);   \
        }                                                                                            \
    }                                                                                                \
    size_t quantize_##lower(const float * src, void * dst, int64_t nrows, int64_t n_per_row,        \
                            const float * imatrix) {                                                 \
        (void) imatrix;                                                                              \
        return pyadaq_quantize_rows(GGML_TYPE_##UPPER, quantize_row_##lower##_ref, src, dst, nrows, n_per_row); \
    }
PYADAQ_TYPES(PYADAQ_DEFINE_REF)

// The implementation a dequantization runs: the scalar reference, or AVX2 when the CPU has it
// (ggml-base is built for the baseline ISA, so the choice is made at run time, once).
int pyadaq_dequant_best(void) {
#ifdef PYADAQ_HAVE_AVX2_DEQUANT
    return pyadaq_cpu_has_avx2() ? PYADAQ_IMPL_AVX2 : PYADAQ_IMPL_SCALAR;
#else
    return PYADAQ_IMPL_SCALAR;
#endif
}

// dequantize_row_<type>: the registered to_float (ggml's type traits, flash attention's V rows)
// runs the best implementation; dequantize_row_<type>_ref is the specification.
#ifdef PYADAQ_HAVE_AVX2_DEQUANT
#define PYADAQ_DEQUANT_AVX2_CASE(lower) \
    case PYADAQ_IMPL_AVX2: if (!pyadaq_cpu_has_avx2()) return -2; dequantize_row_##lower##_avx2(vx, y, k); return 0;
#else
#define PYADAQ_DEQUANT_AVX2_CASE(lower)
#endif
#define PYADAQ_DEFINE_DEQUANT(UPPER, lower, id, QK, BITS, LEVELS, RULE)                              \
    static int dequantize_row_##lower##_impl(const void * vx, float * y, int64_t k, int impl) {     \
        switch (impl) {                                                                              \
            case PYADAQ_IMPL_SCALAR: dequantize_row_##lower##_ref(vx, y, k); return 0;               \
            PYADAQ_DEQUANT_AVX2_CASE(lower)                                                          \
            default: return -2;                                                                      \
        }                                                                                            \
    }                                                                                                \
    void dequantize_row_##lower(const void * vx, float * y, int64_t k) {                            \
        assert(k % (QK) == 0);                                                                       \
        dequantize_row_##lower##_impl(vx, y, k, pyadaq_dequant_best());                              \
    }
PYADAQ_TYPES(PYADAQ_DEFINE_DEQUANT)

size_t pyadaq_quantize_rows(int type, pyadaq_quantize_row_t quantize_row, const float * src, void * dst,
                            int64_t nrows, int64_t n_per_row) {
    const size_t row_size = ggml_row_size((enum ggml_type) type, n_per_row);
    for (int64_t r = 0; r < nrows; ++r) {
        quantize_row(src + r * n_per_row, (char *) dst + r * row_size, n_per_row);
    }
    return (size_t) nrows * row_size;
}

int pyadaq_is_pyadaq_type(int type) {
#define PYADAQ_IS(UPPER, lower, id, QK, BITS, LEVELS, RULE) if (type == (id)) return 1;
    PYADAQ_TYPES(PYADAQ_IS)
#undef PYADAQ_IS
#define PYADAQ_KVT_IS(UPPER, lower, id, ...) if (type == (id)) return 1;
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_IS)
#undef PYADAQ_KVT_IS
    return 0;
}

int pyadaq_quantize_ref(int type, const float * x, void * y, int64_t k) {
#define PYADAQ_Q(UPPER, lower, id, QK, BITS, LEVELS, RULE) \
    if (type == (id)) { if (k % (QK)) return -1; quantize_row_##lower##_ref(x, y, k); return 0; }
    PYADAQ_TYPES(PYADAQ_Q)
#undef PYADAQ_Q
#define PYADAQ_KVT_Q(UPPER, lower, id, ...) \
    if (type == (id)) { if (k % ggml_blck_size(GGML_TYPE_##UPPER)) return -1; quantize_row_##lower##_ref(x, y, k); return 0; }
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_Q)
#undef PYADAQ_KVT_Q
    return -1;
}

int pyadaq_dequantize(int type, const void * x, float * y, int64_t k) {
    return pyadaq_dequantize_impl(type, x, y, k, PYADAQ_IMPL_BEST);
}

int pyadaq_dequantize_impl(int type, const void * x, float * y, int64_t k, int impl) {
    if (impl == PYADAQ_IMPL_BEST) {
        impl = pyadaq_dequant_best();
    }
#define PYADAQ_DQ(UPPER, lower, id, QK, BITS, LEVELS, RULE) \
    if (type == (id)) { if (k % (QK)) return -1; return dequantize_row_##lower##_impl(x, y, k, impl); }
    PYADAQ_TYPES(PYADAQ_DQ)
#undef PYADAQ_DQ
    return pyadaq_kvt_dequantize_impl(type, x, y, k, impl);
}

const char * pyadaq_dequant_impl_name(int impl) {
    if (impl == PYADAQ_IMPL_BEST) {
        impl = pyadaq_dequant_best();
    }
    switch (impl) {
        case PYADAQ_IMPL_SCALAR: return "scalar";
#ifdef PYADAQ_HAVE_AVX2_DEQUANT
        case PYADAQ_IMPL_AVX2: return pyadaq_cpu_has_avx2() ? "avx2" : NULL;
#endif
        default: return NULL;
    }
}
