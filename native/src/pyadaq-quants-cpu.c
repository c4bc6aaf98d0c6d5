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

#include "pyadaq-quants.h"

#include <assert.h>
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

#define PYADAQ_DEFINE_CPU(UPPER, lower, id, QK, BITS, LEVELS, RULE)                                  \
    void quantize_row_##lower(const float * x, void * y, int64_t k) {                                \
        quantize_row_##lower##_ref(x, y, k);                                                         \
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

// Test entry points (pyadaq/_native.py). `impl`: 0 = the generic C path, 1 = the path the
// CPU backend uses (AVX2 where compiled in). Returns -1 for a type that is not pyadaq's.
PYADAQ_API int pyadaq_cpu_vec_dot_q8_0(int type, int n, const void * x, const void * y, int impl, float * out);
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
    return -1;
}

const char * pyadaq_cpu_simd(void) {
#if defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}
