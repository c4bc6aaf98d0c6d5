// CPU backend paths of the pyadaq KV-cache types: quantize on write (SET_ROWS, CPY) and the
// K.Q dot product against q8_0 that CPU flash attention uses. The generic C versions follow
// the reference in pyadaq-quants.c line by line; the AVX2 version is tested against them.

#define GGML_COMMON_IMPL_C
#include "ggml-common.h"
#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "quants.h"
#include "simd-mappings.h"
#include "vec.h"

#include "pyadaq-quants.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// Decode the level indices of one group of 32 values (layout in pyadaq-quants.h).
static inline void pyadaq_group_indices(const uint8_t * qs, const uint8_t * qh, int bits, uint8_t * idx) {
    for (int jj = 0; jj < 32; ++jj) {
        int i = (qs[jj % 8] >> (2 * (jj / 8))) & 3;
        if (bits == 3) {
            i |= ((qh[jj / 8] >> (jj % 8)) & 1) << 2;
        }
        idx[jj] = (uint8_t) i;
    }
}

// Generic dot product of n values of a pyadaq row with a q8_0 row.
static float pyadaq_vec_dot_generic(int n, const uint8_t * x, int qk, int bits, const int8_t * levels,
                                    const block_q8_0 * y) {
    const size_t type_size = PYADAQ_TYPE_SIZE(qk, bits);
    float sumf = 0.0f;
    for (int b = 0; b < n / qk; ++b) {
        const uint8_t * blk = x + b * type_size;
        uint16_t d16;
        memcpy(&d16, blk, sizeof(d16));
        const uint8_t * qs = blk + 2;
        const uint8_t * qh = qs + qk / 4;
        float sumb = 0.0f;
        for (int g = 0; g < qk / 32; ++g) {
            uint8_t idx[32];
            pyadaq_group_indices(qs + 8 * g, bits == 3 ? qh + 4 * g : NULL, bits, idx);
            const block_q8_0 * yb = y + b * (qk / 32) + g;
            int sumi = 0;
            for (int jj = 0; jj < 32; ++jj) {
                sumi += (int) yb->qs[jj] * (int) levels[idx[jj]];
            }
            sumb += GGML_CPU_FP16_TO_FP32(yb->d) * (float) sumi;
        }
        sumf += GGML_CPU_FP16_TO_FP32(d16) * sumb;
    }
    return sumf;
}

#if defined(__AVX2__)
// 32 level indices of one group as bytes 0..7, in value order.
static inline __m256i pyadaq_group_indices_avx2(const uint8_t * qs, const uint8_t * qh, int bits) {
    uint64_t q64;
    memcpy(&q64, qs, sizeof(q64));
    const __m256i q = _mm256_set1_epi64x((long long) q64);
    // lane k of 64 bits holds the codes shifted right by 2k
    const __m256i shifted = _mm256_srlv_epi64(q, _mm256_set_epi64x(6, 4, 2, 0));
    __m256i idx = _mm256_and_si256(shifted, _mm256_set1_epi8(3));
    if (bits == 3) {
        uint32_t h32;
        memcpy(&h32, qh, sizeof(h32));
        // spread bit jj of h32 to byte jj
        const __m256i hb = _mm256_set1_epi32((int) h32);
        const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                               0x0101010101010101, 0x0000000000000000);
        const __m256i bytes = _mm256_shuffle_epi8(hb, shuf);
        const __m256i bit = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        idx = _mm256_or_si256(idx, _mm256_and_si256(set, _mm256_set1_epi8(4)));
    }
    return idx;
}

static inline float pyadaq_hsum_ps(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static float pyadaq_vec_dot_avx2(int n, const uint8_t * x, int qk, int bits, const int8_t * levels,
                                 const block_q8_0 * y) {
    const size_t type_size = PYADAQ_TYPE_SIZE(qk, bits);
    int8_t lut[16] = { 0 };
    memcpy(lut, levels, (size_t) 1 << bits);
    const __m256i lut256 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) lut));
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n / qk; ++b) {
        const uint8_t * blk = x + b * type_size;
        uint16_t d16;
        memcpy(&d16, blk, sizeof(d16));
        const float dx = GGML_CPU_FP16_TO_FP32(d16);
        const uint8_t * qs = blk + 2;
        const uint8_t * qh = qs + qk / 4;
        for (int g = 0; g < qk / 32; ++g) {
            const block_q8_0 * yb = y + b * (qk / 32) + g;
            const __m256i idx = pyadaq_group_indices_avx2(qs + 8 * g, bits == 3 ? qh + 4 * g : NULL, bits);
            const __m256i xv = _mm256_shuffle_epi8(lut256, idx);
            const __m256i yv = _mm256_loadu_si256((const __m256i *) yb->qs);
            // signed x signed bytes: move the sign of x onto y, multiply |x| by it
            const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(yv, xv));
            const __m256i p32 = _mm256_madd_epi16(p16, ones);
            const __m256 scale = _mm256_set1_ps(dx * GGML_CPU_FP16_TO_FP32(yb->d));
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p32), acc);
        }
    }
    return pyadaq_hsum_ps(acc);
}
#endif

#if defined(__AVX2__)
// Quantize one block exactly as quantize_block() in pyadaq-quants.c does, but with eight
// trial scales per AVX2 vector: every lane repeats the reference's float operations for its
// trial in the reference's order (multiplies and adds kept separate, no FMA), so the bytes are
// identical to the reference's; only the blocks with an MSE search take this path.
static void pyadaq_quantize_block_mse_avx2(const float * x, uint8_t * blk, int qk, int bits, const int8_t * levels) {
    const int n_levels = 1 << bits;
    const float lmax = (float) levels[n_levels - 1];
    float xs[64];
    float mids[7];
    const float amax = pyadaq_block_prepare(x, qk, bits, levels, xs, mids);
    float lv[8] = { 0 };
    for (int i = 0; i < n_levels; ++i) {
        lv[i] = (float) levels[i];
    }
    uint8_t idx[64];
    float d = 0.0f;
    if (amax == 0.0f) {
        memset(idx, n_levels / 2, (size_t) qk);
    } else {
        const float base = lmax / amax;
        const __m256 lv8 = _mm256_loadu_ps(lv);
        float score[32], sxl[32], sll[32];
        for (int t0 = 0; t0 < PYADAQ_SEARCH_N; t0 += 8) {
            const __m256 tt = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_set1_epi32(t0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
            const __m256 f = _mm256_add_ps(_mm256_set1_ps(PYADAQ_SEARCH_LO), _mm256_mul_ps(tt, _mm256_set1_ps(PYADAQ_SEARCH_STEP)));
            const __m256 inv = _mm256_mul_ps(_mm256_set1_ps(base), f);
            __m256 vsxl = _mm256_setzero_ps();
            __m256 vsll = _mm256_setzero_ps();
            for (int j = 0; j < qk; ++j) {
                const __m256 xv = _mm256_set1_ps(xs[j]);
                const __m256 v = _mm256_mul_ps(xv, inv);
                __m256i k = _mm256_setzero_si256();
                for (int i = 0; i + 1 < n_levels; ++i) {
                    // the mask is all ones (-1) where v > mid: subtracting it counts
                    k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(mids[i]), _CMP_GT_OQ)));
                }
                const __m256 l = _mm256_permutevar8x32_ps(lv8, k);
                vsxl = _mm256_add_ps(vsxl, _mm256_mul_ps(xv, l));
                vsll = _mm256_add_ps(vsll, _mm256_mul_ps(l, l));
            }
            _mm256_storeu_ps(sxl + t0, vsxl);
            _mm256_storeu_ps(sll + t0, vsll);
            _mm256_storeu_ps(score + t0, _mm256_div_ps(_mm256_mul_ps(vsxl, vsxl), vsll));
        }
        int best = 0;
        float best_score = -1.0f;
        for (int t = 0; t < PYADAQ_SEARCH_N; ++t) {
            if (score[t] > best_score) {
                best_score = score[t];
                best = t;
            }
        }
        const float inv = base * (PYADAQ_SEARCH_LO + (float) best * PYADAQ_SEARCH_STEP);
        for (int j = 0; j < qk; ++j) {
            const float v = xs[j] * inv;
            int i = 0;
            for (int m = 0; m + 1 < n_levels; ++m) {
                i += v > mids[m];
            }
            idx[j] = (uint8_t) i;
        }
        d = sxl[best] / sll[best];
    }
    const ggml_fp16_t d16 = GGML_CPU_FP32_TO_FP16(d);
    memcpy(blk, &d16, sizeof(d16));
    pyadaq_block_pack(idx, qk, bits, blk + 2, blk + 2 + qk / 4);
}

#define PYADAQ_QUANTIZE_ROW(lower, QK, BITS, LEVELS, RULE, x, y, k)                                    \
    do {                                                                                               \
        if ((RULE) != PYADAQ_SCALE_MSE) {                                                              \
            quantize_row_##lower##_ref(x, y, k);                                                       \
            break;                                                                                     \
        }                                                                                              \
        for (int64_t b = 0; b < (k) / (QK); ++b) {                                                     \
            pyadaq_quantize_block_mse_avx2((x) + b * (QK), (uint8_t *) (y) + b * PYADAQ_TYPE_SIZE(QK, BITS), QK, BITS, LEVELS); \
        }                                                                                              \
    } while (0)
#else
#define PYADAQ_QUANTIZE_ROW(lower, QK, BITS, LEVELS, RULE, x, y, k) quantize_row_##lower##_ref(x, y, k)
#endif

#define PYADAQ_DEFINE_CPU(UPPER, lower, id, QK, BITS, LEVELS, RULE)                                  \
    void quantize_row_##lower(const float * x, void * y, int64_t k) {                                \
        assert(k % (QK) == 0);                                                                       \
        PYADAQ_QUANTIZE_ROW(lower, QK, BITS, LEVELS, RULE, x, y, k);                                 \
    }                                                                                                \
    void ggml_vec_dot_##lower##_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx,        \
                                     const void * vy, size_t by, int nrc) {                          \
        assert(nrc == 1);                                                                            \
        assert(n % (QK) == 0);                                                                       \
        (void) bs; (void) bx; (void) by; (void) nrc;                                                 \
        *s = PYADAQ_VEC_DOT_IMPL(n, (const uint8_t *) vx, QK, BITS, LEVELS, (const block_q8_0 *) vy); \
    }

#if defined(__AVX2__)
#define PYADAQ_VEC_DOT_IMPL pyadaq_vec_dot_avx2
#else
#define PYADAQ_VEC_DOT_IMPL pyadaq_vec_dot_generic
#endif

PYADAQ_TYPES(PYADAQ_DEFINE_CPU)

// The transform-coded types: the quantizer (ggml-base's AVX2 search where the CPU has it, the same
// bytes as the reference), and the dot product with a float row (vec_dot_type F32, see
// pyadaq-quants.h): up to 8 blocks dequantized at a time, then ggml's float dot product.
// up to this many blocks are dequantized in one call (a head of up to 512 values at once)
#define PYADAQ_KVT_DOT_BLOCKS 8

static float pyadaq_kvt_vec_dot(int n, const void * vx, int qk, size_t block_bytes, ggml_to_float_t deq, const float * y) {
    float sum = 0.0f;
    float v[PYADAQ_KVT_DOT_BLOCKS * PYADAQ_KVT_QK];
    const int per_call = PYADAQ_KVT_DOT_BLOCKS * PYADAQ_KVT_QK / qk;  // blocks of qk per call
    const int nb = n / qk;
    for (int ib0 = 0; ib0 < nb; ib0 += per_call) {
        const int m = nb - ib0 < per_call ? nb - ib0 : per_call;
        deq((const uint8_t *) vx + (size_t) ib0 * block_bytes, v, (int64_t) m * qk);
        float part;
        ggml_vec_dot_f32(m * qk, &part, 0, v, 0, y + (size_t) ib0 * qk, 0, 1);
        sum += part;
    }
    return sum;
}
static_assert(PYADAQ_KVT_DOT_BLOCKS * PYADAQ_KVT_QK % PYADAQ_KVTR_QK == 0, "whole kvtr rows per call");

#define PYADAQ_DEFINE_KVT_CPU_QK(UPPER, lower, QK)                                                    \
    void quantize_row_##lower(const float * x, void * y, int64_t k) {                                \
        pyadaq_kvt_quantize(GGML_TYPE_##UPPER, x, y, k, PYADAQ_IMPL_BEST);                           \
    }                                                                                                \
    void ggml_vec_dot_##lower##_f32(int n, float * s, size_t bs, const void * vx, size_t bx,         \
                                    const void * vy, size_t by, int nrc) {                           \
        assert(nrc == 1);                                                                            \
        assert(n % (QK) == 0);                                                                       \
        (void) bs; (void) bx; (void) by; (void) nrc;                                                 \
        *s = pyadaq_kvt_vec_dot(n, vx, QK, sizeof(block_##lower), dequantize_row_##lower, (const float *) vy); \
    }
#define PYADAQ_DEFINE_KVT_CPU(UPPER, lower, id, ...) PYADAQ_DEFINE_KVT_CPU_QK(UPPER, lower, PYADAQ_KVT_QK)
#define PYADAQ_DEFINE_KVTR_CPU(UPPER, lower, id, ...) PYADAQ_DEFINE_KVT_CPU_QK(UPPER, lower, PYADAQ_KVTR_QK)
PYADAQ_KVTR_TYPES(PYADAQ_DEFINE_KVTR_CPU)
PYADAQ_KVT_TYPES(PYADAQ_DEFINE_KVT_CPU)

// Test entry points (pyadaq/_native.py). `impl`: 0 = the generic C path, 1 = the path the
// CPU backend uses (AVX2 where compiled in). Returns -1 for a type that is not pyadaq's.
PYADAQ_API int pyadaq_cpu_vec_dot_q8_0(int type, int n, const void * x, const void * y, int impl, float * out);
PYADAQ_API int pyadaq_cpu_vec_dot_f32(int type, int n, const void * x, const float * y, float * out);
PYADAQ_API int pyadaq_cpu_quantize_q8_0(const float * x, void * y, int64_t k);
PYADAQ_API int pyadaq_cpu_quantize(int type, const float * x, void * y, int64_t k);
PYADAQ_API const char * pyadaq_cpu_simd(void);

// The fp16 tables that GGML_CPU_FP16_TO_FP32 reads are filled by ggml_cpu_init(), which a CPU
// backend calls when it is created; these entry points may run before any backend exists.
int pyadaq_cpu_vec_dot_q8_0(int type, int n, const void * x, const void * y, int impl, float * out) {
    ggml_cpu_init();
#define PYADAQ_VD(UPPER, lower, id, QK, BITS, LEVELS, RULE)                                         \
    if (type == (id)) {                                                                          \
        if (n % (QK)) return -1;                                                                 \
        if (impl == 0) {                                                                         \
            *out = pyadaq_vec_dot_generic(n, (const uint8_t *) x, QK, BITS, LEVELS, (const block_q8_0 *) y); \
        } else {                                                                                 \
            ggml_vec_dot_##lower##_q8_0(n, out, 0, x, 0, y, 0, 1);                               \
        }                                                                                        \
        return 0;                                                                                \
    }
    PYADAQ_TYPES(PYADAQ_VD)
#undef PYADAQ_VD
    return -1;
}

int pyadaq_cpu_vec_dot_f32(int type, int n, const void * x, const float * y, float * out) {
    ggml_cpu_init();
#define PYADAQ_KVT_VD(UPPER, lower, id, ...) \
    if (type == (id)) { if (n % ggml_blck_size(GGML_TYPE_##UPPER)) return -1; ggml_vec_dot_##lower##_f32(n, out, 0, x, 0, y, 0, 1); return 0; }
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_VD)
#undef PYADAQ_KVT_VD
    return -1;
}

int pyadaq_cpu_quantize_q8_0(const float * x, void * y, int64_t k) {
    ggml_cpu_init();
    if (k % QK8_0) return -1;
    quantize_row_q8_0(x, y, k);
    return 0;
}

int pyadaq_cpu_quantize(int type, const float * x, void * y, int64_t k) {
    ggml_cpu_init();
#define PYADAQ_CQ(UPPER, lower, id, QK, BITS, LEVELS, RULE) \
    if (type == (id)) { if (k % (QK)) return -1; quantize_row_##lower(x, y, k); return 0; }
    PYADAQ_TYPES(PYADAQ_CQ)
#undef PYADAQ_CQ
#define PYADAQ_KVT_CQ(UPPER, lower, id, ...) \
    if (type == (id)) { if (k % ggml_blck_size(GGML_TYPE_##UPPER)) return -1; quantize_row_##lower(x, y, k); return 0; }
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_CQ)
#undef PYADAQ_KVT_CQ
    return -1;
}

const char * pyadaq_cpu_simd(void) {
#if defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}
