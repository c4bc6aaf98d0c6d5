// pyadaq KV-cache quantization types.
//
// Every pyadaq type has the same shape: blocks of QK values (32 or 64) that
// share one fp16 scale `d`, and per value a 2- or 3-bit index into a small
// signed int8 codebook (the "levels"). A value decodes as
//
//     x = d * levels[index]
//
// The int8 levels make the K.Q dot product an integer dot product against
// q8_0, exactly like upstream's iq4_nl. Bits are laid out per group of 32
// values (a 64-value block is two groups sharing `d`):
//
//     qs[8*g + i], bits 2k..2k+1 : low two index bits of value 32*g + i + 8*k
//     qh[4*g + i/8], bit i%8    : third index bit of value 32*g + i (3-bit only)
//
// The scalar functions in pyadaq-quants.c are the specification; the numpy
// twin in pyadaq/quants_ref.py and the CPU fast paths are checked against them.

#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && !defined(__MINGW32__)
#    define PYADAQ_API __declspec(dllexport) extern
#else
#    define PYADAQ_API __attribute__((visibility("default"))) extern
#endif

// How a type chooses its scale.
enum pyadaq_scale_rule {
    PYADAQ_SCALE_ABSMAX = 0, // d = max|x| / max|level| (the naive rule, kept as a baseline)
    PYADAQ_SCALE_MSE    = 1, // search d for the least squared error of the block
};

// X-macro of every pyadaq type:
//   X(UPPER, lower, id, block size, bits, levels table, scale rule)
// The first two are the recommended types; the others are the candidates the
// format was chosen from (docs/FORMATS.md), kept so the comparison can be rerun.
// Ids sit far above upstream's (GGML_TYPE_Q2_0 = 42) so an upstream bump cannot collide.
#define PYADAQ_TYPES(X)                                                              \
    X(KVQ2,     kvq2,     100, 32, 2, pyadaq_levels_n2, PYADAQ_SCALE_MSE)            \
    X(KVQ3,     kvq3,     101, 32, 3, pyadaq_levels_n3, PYADAQ_SCALE_MSE)            \
    X(KVQ2_U32M, kvq2_u32m, 110, 32, 2, pyadaq_levels_u2, PYADAQ_SCALE_ABSMAX)       \
    X(KVQ2_U32, kvq2_u32, 111, 32, 2, pyadaq_levels_u2, PYADAQ_SCALE_MSE)            \
    X(KVQ2_N64, kvq2_n64, 112, 64, 2, pyadaq_levels_n2, PYADAQ_SCALE_MSE)            \
    X(KVQ3_U32M, kvq3_u32m, 113, 32, 3, pyadaq_levels_u3, PYADAQ_SCALE_ABSMAX)       \
    X(KVQ3_U32, kvq3_u32, 114, 32, 3, pyadaq_levels_u3, PYADAQ_SCALE_MSE)            \
    X(KVQ3_N64, kvq3_n64, 115, 64, 3, pyadaq_levels_n3, PYADAQ_SCALE_MSE)

// Transform-coded types (native/src/pyadaq-kvt.c): for values a calibrated context has put in
// whitened principal coordinates, interleaved by variance rank (pyadaq/runtime/kv_transform.py);
// they need a calibration. Blocks of 64 values: a one-byte scale code e, then 8 groups of 8 values,
// group g with W_g bits per value (a descending profile), stored as W_g bit planes (byte k of the
// group: bit i is bit k of value i's index); a value decodes as d * levels_W[index], levels_W the
// Lloyd-Max levels of a unit Gaussian for W bits (W = 0: 0), d = 2^((e - 128) / 8) (e = 0: d = 0).
//   X(UPPER, lower, id, W0..W7)
// kvt2/3/4: the profile of values (2.5, 3.5, 4.5 bits per value, scale included); kvt2s/3s/4s: a
// steeper one, for keys, whose spectra fall faster (docs/CALIBRATION.md); kvt1: 1.5 bits per value,
// the rung below kvt2 for plans that give a layer's values fewer bits so others get more. Each
// profile is the best descending one of its size for the embedded model's spectra
// (scripts/kvt_profiles.py --same-size).
#define PYADAQ_KVT_TYPES(X)                            \
    X(KVT2,  kvt2,  102, 4, 3, 3, 3, 2, 2, 1, 1)       \
    X(KVT3,  kvt3,  103, 5, 4, 4, 3, 3, 3, 3, 2)       \
    X(KVT4,  kvt4,  104, 6, 5, 5, 4, 4, 4, 4, 3)       \
    X(KVT2S, kvt2s, 105, 5, 3, 3, 2, 2, 2, 1, 1)       \
    X(KVT3S, kvt3s, 106, 6, 4, 4, 3, 3, 3, 2, 2)       \
    X(KVT4S, kvt4s, 107, 7, 5, 4, 4, 4, 4, 4, 3)       \
    X(KVT1,  kvt1,  108, 4, 2, 2, 1, 1, 1, 0, 0)
#define PYADAQ_KVT_QK       64
#define PYADAQ_KVT_GROUP    8
#define PYADAQ_KVT_MAX_BITS 7
#define PYADAQ_KVT_SIZE(W0, W1, W2, W3, W4, W5, W6, W7) (1 + (W0) + (W1) + (W2) + (W3) + (W4) + (W5) + (W6) + (W7))
// Scale codes: d = PYADAQ_KVT_SCALE_MANTISSAS[e % 8] * 2^(e / 8 - 16) for e = 1..255 (exact: a
// float times a power of two), 0 for e = 0.
#define PYADAQ_KVT_SCALE_STEPS 8
#define PYADAQ_KVT_SCALE_BIAS  128
// Scale search: e_rms = the largest code whose scale is at most the rms (weighted by 4^W per
// position; 1 if none), trial t = 0..SEARCH_N-1 the code clamp(e_rms - SEARCH_BELOW + t, 1, 255),
// the least weighted squared error wins (the first on ties).
#define PYADAQ_KVT_SEARCH_N     16
#define PYADAQ_KVT_SEARCH_BELOW 4
#define PYADAQ_KVT_BLOCK(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7) \
    typedef struct { uint8_t e; uint8_t q[PYADAQ_KVT_SIZE(W0, W1, W2, W3, W4, W5, W6, W7) - 1]; } block_##lower;
PYADAQ_KVT_TYPES(PYADAQ_KVT_BLOCK)

// Row-trellis types (pyadaq-kvt.c): a block is a row of 256 values, four kvt blocks' worth: the
// four sub-blocks' scale codes, then one bit stream per width of the profile, each holding the
// values of that width across the row. Widths up to PYADAQ_KVTR_MAX_TRELLIS are coded by a
// tail-biting bitshift trellis (the tables in pyadaq-kvt-trellis.h), wider ones as kvt's Lloyd-Max
// indices. The same sizes as the kvt types of the same bits (2.5 and 3.5 bits per value); a head
// size must be a multiple of 256.
#define PYADAQ_KVTR_TYPES(X)                           \
    X(KVT2R, kvt2r, 109, 4, 3, 3, 2, 2, 2, 2, 1)       \
    X(KVT3R, kvt3r, 116, 5, 4, 3, 3, 3, 3, 3, 3)
#define PYADAQ_KVTR_SUBS        4
#define PYADAQ_KVTR_QK          (PYADAQ_KVTR_SUBS * PYADAQ_KVT_QK)
#define PYADAQ_KVTR_MAX_TRELLIS 3
#define PYADAQ_KVTR_SIZE(W0, W1, W2, W3, W4, W5, W6, W7) (PYADAQ_KVTR_SUBS * PYADAQ_KVT_SIZE(W0, W1, W2, W3, W4, W5, W6, W7))
#define PYADAQ_KVTR_BLOCK(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7)                              \
    typedef struct {                                                                                    \
        uint8_t e[PYADAQ_KVTR_SUBS];                                                                    \
        uint8_t q[PYADAQ_KVTR_SUBS * (PYADAQ_KVT_SIZE(W0, W1, W2, W3, W4, W5, W6, W7) - 1)];             \
    } block_##lower;
PYADAQ_KVTR_TYPES(PYADAQ_KVTR_BLOCK)
// Every transform-coded type, kvt and row types alike (the same row shape), for the registrations
// and dispatches that treat them alike; their block sizes come from the type traits.
#define PYADAQ_KVT_ALL_TYPES(X) PYADAQ_KVT_TYPES(X) PYADAQ_KVTR_TYPES(X)
// Copies the levels for `bits` (1..7) into out (n floats); returns their count, -1 otherwise.
PYADAQ_API int pyadaq_kvt_levels(int bits, float * out, int n);
// The scale d of code e (0..255) into out; returns 0, -1 for a code out of range.
PYADAQ_API int pyadaq_kvt_scale(int e, float * out);
// A transform-coded type's quantization with an explicit implementation (enum pyadaq_impl, below):
// the scalar reference or AVX2 (the same bytes); the CPU backend's quantize_row runs the best.
// Returns 0, -1 (not a kvt type, or k not whole blocks) or -2 (implementation not available).
PYADAQ_API int pyadaq_kvt_quantize(int type, const float * x, void * y, int64_t k, int impl);
// The row-trellis table of `bits` (1..PYADAQ_KVTR_MAX_TRELLIS) into out (n floats); returns its
// size, -1 otherwise. pyadaq_kvt_quantize and the dequantization entries take the kvtr types too.
PYADAQ_API int pyadaq_kvtr_table(int bits, float * out, int n);

// Codebooks, ascending. n2/n3: Lloyd-Max levels of a unit Gaussian (what values
// look like after upstream's Hadamard rotation) scaled to int8; u2/u3: uniform.
PYADAQ_API const int8_t pyadaq_levels_n2[4];
PYADAQ_API const int8_t pyadaq_levels_u2[4];
PYADAQ_API const int8_t pyadaq_levels_n3[8];
PYADAQ_API const int8_t pyadaq_levels_u3[8];

// Scale search of PYADAQ_SCALE_MSE: inverse scales (L/amax)*(SEARCH_LO + t*SEARCH_STEP), t = 0..SEARCH_N-1.
#define PYADAQ_SEARCH_N    27
#define PYADAQ_SEARCH_LO   0.70f
#define PYADAQ_SEARCH_STEP 0.05f

// Block layouts. `d` is a ggml_half, spelled uint16_t so this header stands alone.
#define PYADAQ_BLOCK_2(QK) struct { uint16_t d; uint8_t qs[(QK)/4]; }
#define PYADAQ_BLOCK_3(QK) struct { uint16_t d; uint8_t qs[(QK)/4]; uint8_t qh[(QK)/8]; }

typedef PYADAQ_BLOCK_2(32) block_pyadaq_2x32;
typedef PYADAQ_BLOCK_2(64) block_pyadaq_2x64;
typedef PYADAQ_BLOCK_3(32) block_pyadaq_3x32;
typedef PYADAQ_BLOCK_3(64) block_pyadaq_3x64;

#ifndef __cplusplus
_Static_assert(sizeof(block_pyadaq_2x32) == 2 + 32/4,          "wrong pyadaq 2-bit/32 block size/padding");
_Static_assert(sizeof(block_pyadaq_2x64) == 2 + 64/4,          "wrong pyadaq 2-bit/64 block size/padding");
_Static_assert(sizeof(block_pyadaq_3x32) == 2 + 32/4 + 32/8,   "wrong pyadaq 3-bit/32 block size/padding");
_Static_assert(sizeof(block_pyadaq_3x64) == 2 + 64/4 + 64/8,   "wrong pyadaq 3-bit/64 block size/padding");
#endif

#define PYADAQ_BLOCK_TYPE(QK, BITS) block_pyadaq_##BITS##x##QK
#define PYADAQ_TYPE_SIZE(QK, BITS) (2 + (QK)/4 + ((BITS) == 3 ? (QK)/8 : 0))

// Per type: reference quantize (the spec), dequantize, and ggml_quantize_chunk's entry.
#define PYADAQ_DECLARE_REF(UPPER, lower, id, QK, BITS, LEVELS, RULE)                                          \
    PYADAQ_API void   quantize_row_##lower##_ref(const float * x, void * y, int64_t k);                       \
    PYADAQ_API void   dequantize_row_##lower##_ref(const void * x, float * y, int64_t k);                     \
    PYADAQ_API void   dequantize_row_##lower(const void * x, float * y, int64_t k);                           \
    PYADAQ_API size_t quantize_##lower(const float * src, void * dst, int64_t nrows, int64_t n_per_row,      \
                                       const float * imatrix);
PYADAQ_TYPES(PYADAQ_DECLARE_REF)
#define PYADAQ_KVT_DECLARE(UPPER, lower, id, ...) PYADAQ_DECLARE_REF(UPPER, lower, id, 64, 0, 0, 0)
PYADAQ_KVT_TYPES(PYADAQ_KVT_DECLARE)
#define PYADAQ_KVTR_DECLARE(UPPER, lower, id, ...) PYADAQ_DECLARE_REF(UPPER, lower, id, 256, 0, 0, 0)
PYADAQ_KVTR_TYPES(PYADAQ_KVTR_DECLARE)

// Per type, CPU backend (pyadaq-quants-cpu.c): fast quantize and the dot product with q8_0.
#define PYADAQ_DECLARE_CPU(UPPER, lower, id, QK, BITS, LEVELS, RULE)                                          \
    void quantize_row_##lower(const float * x, void * y, int64_t k);                                          \
    void ggml_vec_dot_##lower##_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx,                 \
                                     const void * vy, size_t by, int nrc);
PYADAQ_TYPES(PYADAQ_DECLARE_CPU)
// The transform-coded types' dot product takes the other side in float (vec_dot_type F32): their
// keys are whitened, so a query in the cache's coordinates spans the keys' whole spectrum, and
// rounding it to q8_0 (one scale per 32 values) would lose its small components, which whitened
// keys weigh as much as the large ones (free-running generation with kvt4s keys on the embedded
// model fell into repeated digits).
#define PYADAQ_KVT_DECLARE_CPU(UPPER, lower, id, ...)                                                         \
    void quantize_row_##lower(const float * x, void * y, int64_t k);                                          \
    void ggml_vec_dot_##lower##_f32(int n, float * s, size_t bs, const void * vx, size_t bx,                  \
                                    const void * vy, size_t by, int nrc);
PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_DECLARE_CPU)

// Registration rows spliced into upstream's tables by the patches in native/patches.
#define PYADAQ_TRAITS_ROW(UPPER, lower, id, QK, BITS, LEVELS, RULE)          \
    [GGML_TYPE_##UPPER] = {                                                  \
        .type_name      = #lower,                                            \
        .blck_size      = QK,                                                \
        .type_size      = PYADAQ_TYPE_SIZE(QK, BITS),                        \
        .is_quantized   = true,                                              \
        .to_float       = (ggml_to_float_t) dequantize_row_##lower,          \
        .from_float_ref = (ggml_from_float_t) quantize_row_##lower##_ref,    \
    },
// The ids between upstream's last type (GGML_TYPE_Q2_0 = 42) and GGML_TYPE_COUNT that name no
// type get a row the way upstream marks its retired ids (a name, block size 0): ggml_type_name
// never returns NULL for an id below GGML_TYPE_COUNT, and gguf.cpp rejects a tensor of such a
// type with a message that names it.
#define PYADAQ_FIRST_UNUSED_TYPE_ID 43
#define PYADAQ_UNUSED_TYPE_IDS(X) \
    X(43) X(44) X(45) X(46) X(47) X(48) X(49) X(50) X(51) X(52) X(53) X(54) \
    X(55) X(56) X(57) X(58) X(59) X(60) X(61) X(62) X(63) X(64) X(65) X(66) \
    X(67) X(68) X(69) X(70) X(71) X(72) X(73) X(74) X(75) X(76) X(77) X(78) \
    X(79) X(80) X(81) X(82) X(83) X(84) X(85) X(86) X(87) X(88) X(89) X(90) \
    X(91) X(92) X(93) X(94) X(95) X(96) X(97) X(98) X(99)
#define PYADAQ_UNUSED_ROW(id)                                                \
    [id] = {                                                                 \
        .type_name      = "unused type id " #id " (reserved by pyadaq)",   \
        .blck_size      = 0,                                                 \
        .type_size      = 0,                                                 \
        .is_quantized   = false,                                             \
    },
#define PYADAQ_KVT_TRAITS_ROW(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7) \
    [GGML_TYPE_##UPPER] = {                                                  \
        .type_name      = #lower,                                            \
        .blck_size      = PYADAQ_KVT_QK,                                     \
        .type_size      = PYADAQ_KVT_SIZE(W0, W1, W2, W3, W4, W5, W6, W7),   \
        .is_quantized   = true,                                              \
        .to_float       = (ggml_to_float_t) dequantize_row_##lower,          \
        .from_float_ref = (ggml_from_float_t) quantize_row_##lower##_ref,    \
    },
#define PYADAQ_KVTR_TRAITS_ROW(UPPER, lower, id, W0, W1, W2, W3, W4, W5, W6, W7) \
    [GGML_TYPE_##UPPER] = {                                                  \
        .type_name      = #lower,                                            \
        .blck_size      = PYADAQ_KVTR_QK,                                    \
        .type_size      = PYADAQ_KVTR_SIZE(W0, W1, W2, W3, W4, W5, W6, W7),  \
        .is_quantized   = true,                                              \
        .to_float       = (ggml_to_float_t) dequantize_row_##lower,          \
        .from_float_ref = (ggml_from_float_t) quantize_row_##lower##_ref,    \
    },
#define PYADAQ_GGML_TYPE_TRAITS PYADAQ_TYPES(PYADAQ_TRAITS_ROW) PYADAQ_KVT_TYPES(PYADAQ_KVT_TRAITS_ROW) \
    PYADAQ_KVTR_TYPES(PYADAQ_KVTR_TRAITS_ROW) PYADAQ_UNUSED_TYPE_IDS(PYADAQ_UNUSED_ROW)

#define PYADAQ_TRAITS_CPU_ROW(UPPER, lower, id, QK, BITS, LEVELS, RULE)      \
    [GGML_TYPE_##UPPER] = {                                                  \
        .from_float   = quantize_row_##lower,                                \
        .vec_dot      = ggml_vec_dot_##lower##_q8_0,                         \
        .vec_dot_type = GGML_TYPE_Q8_0,                                      \
        .nrows        = 1,                                                   \
    },
#define PYADAQ_KVT_TRAITS_CPU_ROW(UPPER, lower, id, ...)                     \
    [GGML_TYPE_##UPPER] = {                                                  \
        .from_float   = quantize_row_##lower,                                \
        .vec_dot      = ggml_vec_dot_##lower##_f32,                          \
        .vec_dot_type = GGML_TYPE_F32,                                       \
        .nrows        = 1,                                                   \
    },
#define PYADAQ_GGML_TYPE_TRAITS_CPU PYADAQ_TYPES(PYADAQ_TRAITS_CPU_ROW) PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_TRAITS_CPU_ROW)

#define PYADAQ_CASE_ROW(UPPER, lower, id, QK, BITS, LEVELS, RULE) case GGML_TYPE_##UPPER:
#define PYADAQ_KVT_CASE_ROW(UPPER, ...) case GGML_TYPE_##UPPER:
#define PYADAQ_GGML_TYPE_CASES PYADAQ_TYPES(PYADAQ_CASE_ROW) PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_CASE_ROW)

#define PYADAQ_QUANTIZE_CHUNK_ROW(UPPER, lower, id, QK, BITS, LEVELS, RULE) \
    case GGML_TYPE_##UPPER: result = quantize_##lower(src + start, (char *) dst + start_row * row_size, nrows, n_per_row, imatrix); break;
#define PYADAQ_KVT_QUANTIZE_CHUNK_ROW(UPPER, lower, id, ...) PYADAQ_QUANTIZE_CHUNK_ROW(UPPER, lower, id, 64, 0, 0, 0)
#define PYADAQ_GGML_QUANTIZE_CHUNK_CASES PYADAQ_TYPES(PYADAQ_QUANTIZE_CHUNK_ROW) \
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_QUANTIZE_CHUNK_ROW)

// ggml_quantize_chunk's work for a pyadaq type: nrows rows of n_per_row values, each through
// quantize_row (the type's reference quantizer); returns the bytes written.
typedef void (*pyadaq_quantize_row_t)(const float * x, void * y, int64_t k);
PYADAQ_API size_t pyadaq_quantize_rows(int type, pyadaq_quantize_row_t quantize_row, const float * src, void * dst,
                                       int64_t nrows, int64_t n_per_row);

// Steps of the reference quantizer shared with the CPU fast path (pyadaq-quants.c):
// non-finite inputs become 0 in xs, the midpoints between levels go to mids, returns max|xs|;
// and the packing of level indices into qs/qh.
PYADAQ_API float pyadaq_block_prepare(const float * x, int qk, int bits, const int8_t * levels, float * xs, float * mids);
PYADAQ_API void  pyadaq_block_pack(const uint8_t * idx, int qk, int bits, uint8_t * qs, uint8_t * qh);

// Entry points for tests and tools, by ggml type id (bound with cffi in pyadaq/_native.py).
// Each returns 0 on success and -1 if `type` is not a pyadaq type or `k` is not a multiple of its block.
PYADAQ_API int pyadaq_quantize_ref(int type, const float * x, void * y, int64_t k);
PYADAQ_API int pyadaq_dequantize(int type, const void * x, float * y, int64_t k);
// Dequantization with an explicit implementation: PYADAQ_IMPL_SCALAR is the reference
// (dequantize_row_<type>_ref), PYADAQ_IMPL_AVX2 the x86 path, PYADAQ_IMPL_BEST what the
// registered to_float (dequantize_row_<type>) runs on this CPU. Returns -2 for an
// implementation this build or CPU does not have; pyadaq_dequant_impl_name gives its name
// ("scalar", "avx2") or NULL when it is not available.
enum pyadaq_impl { PYADAQ_IMPL_SCALAR = 0, PYADAQ_IMPL_AVX2 = 1, PYADAQ_IMPL_BEST = -1 };
PYADAQ_API int pyadaq_dequantize_impl(int type, const void * x, float * y, int64_t k, int impl);
PYADAQ_API const char * pyadaq_dequant_impl_name(int impl);
PYADAQ_API int pyadaq_is_pyadaq_type(int type);
// inside ggml-base: the implementation the registered to_float runs on this CPU, whether it has
// AVX2 (x86 builds), and the transform-coded types' dispatch (pyadaq-kvt.c; -1: not a kvt type,
// -2: implementation not available)
int pyadaq_dequant_best(void);
int pyadaq_cpu_has_avx2(void);
int pyadaq_kvt_dequantize_impl(int type, const void * x, float * y, int64_t k, int impl);

// ggml-cpu: flash-attention ops with a quantized K or V that ran on the tiled path
// (native/src/pyadaq-fa-cpu.cpp)
PYADAQ_API int64_t pyadaq_cpu_fa_tiled(void);
// Flash-attention ops that ran on its generation kernel (grouped query heads, split KV), likewise.
PYADAQ_API int64_t pyadaq_cpu_fa_decode(void);

#ifdef __cplusplus
}
#endif
