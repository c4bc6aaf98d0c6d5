// pyadaq's KV-cache types in ggml's CUDA backend.
//
// Device functions in the shapes upstream's templates take, so that the patch to ggml-cuda
// (native/patches/0007) only adds case labels and call sites:
//   - quantize one block         (SET_ROWS via set_rows_cuda_quant, CPY f32 -> kvq)
//   - dequantize two values      (GET_ROWS, f16/f32/bf16 conversion: prompt-processing flash
//                                 attention converts K and V to f16 with these)
//   - flash attention's vector kernel: K.Q dot product against Q quantized to 8 bits (dp4a of
//     the int8 levels) and V dequantization.
// The arithmetic is in pyadaq-kvq-block.h, shared with a host test.
//
// Only kvq2 and kvq3 run on CUDA; the research candidates of docs/FORMATS.md are CPU-only
// (pyadaq refuses them for a GPU-resident cache at context creation).

#pragma once

#include "common.cuh"
#include "pyadaq-kvq-block.h"

static_assert(PYADAQ_KVQ_QK == QK8_1, "a kvq block spans one q8_1 block of Q");
static_assert(PYADAQ_KVQ_QK / 4 == QI8_0, "8 ints of Q per kvq block");

static constexpr __host__ __device__ bool pyadaq_cuda_is_kvq(ggml_type t) {
    return t == GGML_TYPE_KVQ2 || t == GGML_TYPE_KVQ3;
}
static constexpr __host__ __device__ int pyadaq_cuda_kvq_bits(ggml_type t) {
    return t == GGML_TYPE_KVQ2 ? 2 : 3;
}

// ---- upstream's block-quantize shape: void (const float *, block *) -------------------------

static __device__ __forceinline__ void pyadaq_cuda_quantize_kvq2(const float * x, block_kvq2 * y) {
    pyadaq_kvq_quantize_block<2>(x, y);
}
static __device__ __forceinline__ void pyadaq_cuda_quantize_kvq3(const float * x, block_kvq3 * y) {
    pyadaq_kvq_quantize_block<3>(x, y);
}

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
#define PYADAQ_CUDA_QR 1

// Case labels for upstream's conversion switches (convert.cu): FN<qk, qr, dequantize>.
#define PYADAQ_CUDA_CONVERT_CASES(FN)                                                         \
    case GGML_TYPE_KVQ2: return FN<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq2>; \
    case GGML_TYPE_KVQ3: return FN<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq3>;

// Case labels for getrows.cu's switch (its local variable names).
#define PYADAQ_CUDA_GET_ROWS_CASES                                                                     \
    case GGML_TYPE_KVQ2:                                                                               \
        get_rows_cuda_q<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq2>(src0_d, src1_d, dst_d, \
            ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);        \
        break;                                                                                         \
    case GGML_TYPE_KVQ3:                                                                               \
        get_rows_cuda_q<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq3>(src0_d, src1_d, dst_d, \
            ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);        \
        break;

// Plain case labels (supports_op lists).
#define PYADAQ_CUDA_TYPE_CASES case GGML_TYPE_KVQ2: case GGML_TYPE_KVQ3:

// ---- CPY f32 <-> kvq (pyadaq-cuda.cu) -------------------------------------------------------

// f32 -> kvq and kvq -> f32, whole blocks within rows on both sides.
bool pyadaq_cuda_cpy_supported(const ggml_tensor * src0, const ggml_tensor * src1);
// Runs the copy and returns true when it is one of pyadaq's, returns false otherwise.
bool pyadaq_cuda_cpy(const ggml_tensor * src0, ggml_tensor * src1, cudaStream_t stream);
