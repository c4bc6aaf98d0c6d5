// pyadaq's KV-cache types in ggml's CUDA backend.
//
// Device functions in the shapes upstream's templates take, so that the patch to ggml-cuda
// (native/patches/0007) only adds case labels and call sites:
//   - quantize one block         (SET_ROWS via set_rows_cuda_quant, CPY f32 -> kvq)
//   - dequantize two values      (GET_ROWS, f16/f32/bf16 conversion: prompt-processing flash
//                                 attention converts K and V to f16 with these)
//   - flash attention's vector kernel: K.Q dot product against Q quantized to 8 bits (dp4a of
//     the int8 levels) and V dequantization.
// The arithmetic is in pyadaq-kvq-block.h and pyadaq-kvt-block.h, shared with a host test.
//
// kvq2, kvq3 and the transform-coded kvt1/kvt2/kvt3/kvt4/kvt2s/kvt3s/kvt4s run on CUDA; the research
// candidates of docs/FORMATS.md are CPU-only (pyadaq refuses them for a GPU-resident cache at
// context creation).

#pragma once

#include "common.cuh"
#include "pyadaq-kvq-block.h"
#include "pyadaq-kvt-block.h"

static_assert(PYADAQ_KVQ_QK == QK8_1, "a kvq block spans one q8_1 block of Q");
static_assert(PYADAQ_KVQ_QK / 4 == QI8_0, "8 ints of Q per kvq block");
static_assert(PYADAQ_KVT_QK == 2 * QK8_1, "a kvt block spans two q8_1 blocks of Q");

static constexpr __host__ __device__ bool pyadaq_cuda_is_kvq(ggml_type t) {
    return t == GGML_TYPE_KVQ2 || t == GGML_TYPE_KVQ3;
}
static constexpr __host__ __device__ int pyadaq_cuda_kvq_bits(ggml_type t) {
    return t == GGML_TYPE_KVQ2 ? 2 : 3;
}
#define PYADAQ_CUDA_OR_IS_KVT(UPPER, lower, id, ...) || t == GGML_TYPE_##UPPER
static constexpr __host__ __device__ bool pyadaq_cuda_is_kvt(ggml_type t) {
    return false PYADAQ_KVT_TYPES(PYADAQ_CUDA_OR_IS_KVT);
}
#undef PYADAQ_CUDA_OR_IS_KVT
// any of pyadaq's types that run on CUDA
static constexpr __host__ __device__ bool pyadaq_cuda_is_pyadaq(ggml_type t) {
    return pyadaq_cuda_is_kvq(t) || pyadaq_cuda_is_kvt(t);
}

// ---- upstream's block-quantize shape: void (const float *, block *) -------------------------

static __device__ __forceinline__ void pyadaq_cuda_quantize_kvq2(const float * x, block_kvq2 * y) {
    pyadaq_kvq_quantize_block<2>(x, y);
}
static __device__ __forceinline__ void pyadaq_cuda_quantize_kvq3(const float * x, block_kvq3 * y) {
    pyadaq_kvq_quantize_block<3>(x, y);
}
#define PYADAQ_CUDA_KVT_QUANTIZE(UPPER, lower, id, ...)                                              \
    static __device__ __forceinline__ void pyadaq_cuda_quantize_##lower(const float * x, block_##lower * y) { \
        pyadaq_kvt_quantize_block<id>(x, y);                                                         \
    }
PYADAQ_KVT_TYPES(PYADAQ_CUDA_KVT_QUANTIZE)
#undef PYADAQ_CUDA_KVT_QUANTIZE

// ---- upstream's dequantize_kernel_t shape, qr = 1: values iqs and iqs+1 of block ib ---------

template <int BITS>
static __device__ __forceinline__ void pyadaq_cuda_dequantize_kvq(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const typename pyadaq_kvq_block<BITS>::type * x = (const typename pyadaq_kvq_block<BITS>::type *) vx;
    pyadaq_kvq_dequant2<BITS>(x + ib, iqs, &v.x, &v.y);
}
static __device__ __forceinline__ void pyadaq_cuda_dequantize_kvq2(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    pyadaq_cuda_dequantize_kvq<2>(vx, ib, iqs, v);
}
static __device__ __forceinline__ void pyadaq_cuda_dequantize_kvq3(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    pyadaq_cuda_dequantize_kvq<3>(vx, ib, iqs, v);
}
#define PYADAQ_CUDA_KVT_DEQUANTIZE(UPPER, lower, id, ...)                                            \
    static __device__ __forceinline__ void pyadaq_cuda_dequantize_##lower(const void * vx, const int64_t ib, \
                                                                        const int iqs, float2 & v) { \
        pyadaq_kvt_dequant2<id>((const block_##lower *) vx + ib, iqs, &v.x, &v.y);                   \
    }
PYADAQ_KVT_TYPES(PYADAQ_CUDA_KVT_DEQUANTIZE)
#undef PYADAQ_CUDA_KVT_DEQUANTIZE
#define PYADAQ_CUDA_QR 1

// Case labels for upstream's conversion switches (convert.cu): FN<qk, qr, dequantize>.
#define PYADAQ_CUDA_KVT_CONVERT_CASE(FN, UPPER, lower) \
    case GGML_TYPE_##UPPER: return FN<PYADAQ_KVT_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_##lower>;
#define PYADAQ_CUDA_CONVERT_CASES(FN)                                                         \
    case GGML_TYPE_KVQ2: return FN<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq2>; \
    case GGML_TYPE_KVQ3: return FN<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq3>; \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT2, kvt2) PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT3, kvt3)  \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT4, kvt4) PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT2S, kvt2s) \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT3S, kvt3s) PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT4S, kvt4s) \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT1, kvt1)

#define PYADAQ_CUDA_KVT_GET_ROWS_CASE(UPPER, lower, ...)                                                 \
    case GGML_TYPE_##UPPER:                                                                            \
        get_rows_cuda_q<PYADAQ_KVT_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_##lower>(src0_d, src1_d, dst_d, \
            ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);        \
        break;
// Case labels for getrows.cu's switch (its local variable names).
#define PYADAQ_CUDA_GET_ROWS_CASES                                                                     \
    case GGML_TYPE_KVQ2:                                                                               \
        get_rows_cuda_q<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq2>(src0_d, src1_d, dst_d, \
            ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);        \
        break;                                                                                         \
    case GGML_TYPE_KVQ3:                                                                               \
        get_rows_cuda_q<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq3>(src0_d, src1_d, dst_d, \
            ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);        \
        break;                                                                                         \
    PYADAQ_KVT_TYPES(PYADAQ_CUDA_KVT_GET_ROWS_CASE)

// Plain case labels (supports_op lists).
#define PYADAQ_CUDA_KVT_CASE_LABEL(UPPER, ...) case GGML_TYPE_##UPPER:
#define PYADAQ_CUDA_TYPE_CASES case GGML_TYPE_KVQ2: case GGML_TYPE_KVQ3: PYADAQ_KVT_TYPES(PYADAQ_CUDA_KVT_CASE_LABEL)

// set-rows.cu's branches after its kvq3 one (its local variable names).
#define PYADAQ_CUDA_KVT_SET_ROWS_BRANCH(UPPER, lower, id, ...)                                        \
    else if (dst->type == GGML_TYPE_##UPPER) {                                                       \
        set_rows_cuda_quant<idx_t, block_##lower, PYADAQ_KVT_QK, pyadaq_cuda_quantize_##lower>(       \
            src0_d, src1_d, (block_##lower *) dst->data, ne00, ne01, ne02, ne03, ne10, ne11, ne12, ne13, \
            nb01, nb02, nb03, nb10, nb11, nb12, nb1, nb2, nb3, stream);                               \
    }
#define PYADAQ_CUDA_SET_ROWS_KVT_BRANCHES PYADAQ_KVT_TYPES(PYADAQ_CUDA_KVT_SET_ROWS_BRANCH)

// ---- CPY f32 <-> kvq (pyadaq-cuda.cu) -------------------------------------------------------

// f32 -> kvq and kvq -> f32, whole blocks within rows on both sides.
bool pyadaq_cuda_cpy_supported(const ggml_tensor * src0, const ggml_tensor * src1);
// Runs the copy and returns true when it is one of pyadaq's, returns false otherwise.
bool pyadaq_cuda_cpy(const ggml_tensor * src0, ggml_tensor * src1, cudaStream_t stream);
