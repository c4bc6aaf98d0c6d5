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
// kvq2, kvq3, the transform-coded kvt1/kvt2/kvt3/kvt4/kvt2s/kvt3s/kvt4s and the row-trellis kvt2r/kvt3r
// (SET_ROWS and CPY f32 -> kvt*r by pyadaq's own one-warp-per-row kernels) run on CUDA; the research
// candidates of docs/FORMATS.md are CPU-only (pyadaq refuses them for a GPU-resident cache at
// context creation).

#pragma once

#include "common.cuh"
#include "pyadaq-kvq-block.h"
#include "pyadaq-kvt-block.h"
#include "pyadaq-kvtr-block.h"

static_assert(PYADAQ_KVQ_QK == QK8_1, "a kvq block spans one q8_1 block of Q");
static_assert(PYADAQ_KVQ_QK / 4 == QI8_0, "8 ints of Q per kvq block");
static_assert(PYADAQ_KVT_QK == 2 * QK8_1, "a kvt block spans two q8_1 blocks of Q");
static_assert(PYADAQ_KVTR_QK == 8 * QK8_1, "a row-trellis block spans eight q8_1 blocks of Q");

static constexpr __host__ __device__ bool pyadaq_cuda_is_kvq(ggml_type t) {
    return t == GGML_TYPE_KVQ2 || t == GGML_TYPE_KVQ3;
}
static constexpr __host__ __device__ int pyadaq_cuda_kvq_bits(ggml_type t) {
    return t == GGML_TYPE_KVQ2 ? 2 : 3;
}
#define PYADAQ_CUDA_OR_IS_KVT(UPPER, lower, id, ...) || t == GGML_TYPE_##UPPER
// any transform-coded type, the row-trellis ones included
static constexpr __host__ __device__ bool pyadaq_cuda_is_kvt(ggml_type t) {
    return false PYADAQ_KVT_ALL_TYPES(PYADAQ_CUDA_OR_IS_KVT);
}
// the row-trellis types (blocks of 256, encoded by one warp)
static constexpr __host__ __device__ bool pyadaq_cuda_is_kvtr(ggml_type t) {
    return false PYADAQ_KVTR_TYPES(PYADAQ_CUDA_OR_IS_KVT);
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
        pyadaq_kvt_row_dequant2<id>((const block_##lower *) vx + ib, iqs, &v.x, &v.y);               \
    }
PYADAQ_KVT_ALL_TYPES(PYADAQ_CUDA_KVT_DEQUANTIZE)
#undef PYADAQ_CUDA_KVT_DEQUANTIZE
#define PYADAQ_CUDA_QR 1

// Case labels for upstream's conversion switches (convert.cu): FN<qk, qr, dequantize>.
#define PYADAQ_CUDA_KVT_CONVERT_CASE(FN, UPPER, lower) \
    case GGML_TYPE_##UPPER: return FN<pyadaq_kvt_qk<GGML_TYPE_##UPPER>(), PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_##lower>;
#define PYADAQ_CUDA_CONVERT_CASES(FN)                                                         \
    case GGML_TYPE_KVQ2: return FN<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq2>; \
    case GGML_TYPE_KVQ3: return FN<PYADAQ_KVQ_QK, PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_kvq3>; \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT2, kvt2) PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT3, kvt3)  \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT4, kvt4) PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT2S, kvt2s) \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT3S, kvt3s) PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT4S, kvt4s) \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT1, kvt1) PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT2R, kvt2r)  \
    PYADAQ_CUDA_KVT_CONVERT_CASE(FN, KVT3R, kvt3r)

#define PYADAQ_CUDA_KVT_GET_ROWS_CASE(UPPER, lower, ...)                                                 \
    case GGML_TYPE_##UPPER:                                                                            \
        get_rows_cuda_q<pyadaq_kvt_qk<GGML_TYPE_##UPPER>(), PYADAQ_CUDA_QR, pyadaq_cuda_dequantize_##lower>(src0_d, src1_d, dst_d, \
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
    PYADAQ_KVT_ALL_TYPES(PYADAQ_CUDA_KVT_GET_ROWS_CASE)

// Plain case labels (supports_op lists).
#define PYADAQ_CUDA_KVT_CASE_LABEL(UPPER, ...) case GGML_TYPE_##UPPER:
#define PYADAQ_CUDA_TYPE_CASES case GGML_TYPE_KVQ2: case GGML_TYPE_KVQ3: PYADAQ_KVT_ALL_TYPES(PYADAQ_CUDA_KVT_CASE_LABEL)

// set-rows.cu's branches after its kvq3 one (its local variable names).
#define PYADAQ_CUDA_KVT_SET_ROWS_BRANCH(UPPER, lower, id, ...)                                        \
    else if (dst->type == GGML_TYPE_##UPPER) {                                                       \
        set_rows_cuda_quant<idx_t, block_##lower, PYADAQ_KVT_QK, pyadaq_cuda_quantize_##lower>(       \
            src0_d, src1_d, (block_##lower *) dst->data, ne00, ne01, ne02, ne03, ne10, ne11, ne12, ne13, \
            nb01, nb02, nb03, nb10, nb11, nb12, nb1, nb2, nb3, stream);                               \
    }
// The row-trellis types: one warp per row of 256 values (pyadaq_kvtr_quantize_row), its Viterbi
// search's costs and back-pointers in shared memory; the index arithmetic of upstream's
// k_set_rows_quant.
template <typename idx_t, int ID>
static __global__ void __launch_bounds__(WARP_SIZE) pyadaq_k_set_rows_kvtr(
        const float * __restrict__ src0, const idx_t * __restrict__ src1, char * __restrict__ dst,
        const int64_t nb0, const int64_t ne01, const int64_t ne02, const int64_t ne11, const int64_t ne12,
        const int64_t s01, const int64_t s02, const int64_t s03, const int64_t s10, const int64_t s11, const int64_t s12,
        const int64_t s1, const int64_t s2, const int64_t s3) {
    static_assert(WARP_SIZE == 32, "one warp of 32 lanes per row");
    typedef typename pyadaq_kvt_block<ID>::type block_t;
    __shared__ pyadaq_kvtr_scratch scratch;
    int64_t i = blockIdx.x;  // (i00 / 256, i01, i02, i03)
    const int64_t ib0 = i % nb0;
    i /= nb0;
    const int64_t i01 = i % ne01;
    i /= ne01;
    const int64_t i02 = i % ne02;
    const int64_t i03 = i / ne02;
    const int64_t i12 = i03 % ne12;
    const int64_t i11 = i02 % ne11;
    const int64_t dst_row = src1[i01*s10 + i11*s11 + i12*s12];
    const float * x = src0 + i01*s01 + i02*s02 + i03*s03 + ib0*PYADAQ_KVTR_QK;
    block_t * y = (block_t *) (dst + dst_row*s1 + i02*s2 + i03*s3) + ib0;
    pyadaq_kvtr_quantize_row<ID>(x, 1, y, &scratch);
}

template <typename idx_t, int ID>
static void pyadaq_set_rows_kvtr_cuda(
        const float * src0_d, const idx_t * src1_d, char * dst_d,
        const int64_t ne00, const int64_t ne01, const int64_t ne02, const int64_t ne03,
        const int64_t ne11, const int64_t ne12,
        const size_t nb01, const size_t nb02, const size_t nb03,
        const size_t nb10, const size_t nb11, const size_t nb12,
        const size_t nb1, const size_t nb2, const size_t nb3,
        cudaStream_t stream) {
    GGML_ASSERT(ne00 % PYADAQ_KVTR_QK == 0);
    const int64_t n = ne00 / PYADAQ_KVTR_QK * ne01 * ne02 * ne03;
    if (n == 0 || ne11 == 0 || ne12 == 0) {
        return;
    }
    GGML_ASSERT(n <= INT_MAX);
    pyadaq_k_set_rows_kvtr<idx_t, ID><<<(int) n, WARP_SIZE, 0, stream>>>(
        src0_d, src1_d, dst_d, ne00 / PYADAQ_KVTR_QK, ne01, ne02, ne11, ne12,
        nb01/sizeof(float), nb02/sizeof(float), nb03/sizeof(float), nb10/sizeof(idx_t), nb11/sizeof(idx_t), nb12/sizeof(idx_t),
        nb1, nb2, nb3);
    CUDA_CHECK(cudaGetLastError());
}

#define PYADAQ_CUDA_KVTR_SET_ROWS_BRANCH(UPPER, lower, id, ...)                                       \
    else if (dst->type == GGML_TYPE_##UPPER) {                                                       \
        pyadaq_set_rows_kvtr_cuda<idx_t, id>(src0_d, src1_d, (char *) dst->data, ne00, ne01, ne02, ne03, \
            ne11, ne12, nb01, nb02, nb03, nb10, nb11, nb12, nb1, nb2, nb3, stream);                   \
    }
#define PYADAQ_CUDA_SET_ROWS_KVT_BRANCHES PYADAQ_KVT_TYPES(PYADAQ_CUDA_KVT_SET_ROWS_BRANCH) \
    PYADAQ_KVTR_TYPES(PYADAQ_CUDA_KVTR_SET_ROWS_BRANCH)

// ---- CPY f32 <-> kvq (pyadaq-cuda.cu) -------------------------------------------------------

// f32 -> kvq and kvq -> f32, whole blocks within rows on both sides.
bool pyadaq_cuda_cpy_supported(const ggml_tensor * src0, const ggml_tensor * src1);
// Runs the copy and returns true when it is one of pyadaq's, returns false otherwise.
bool pyadaq_cuda_cpy(const ggml_tensor * src0, ggml_tensor * src1, cudaStream_t stream);
