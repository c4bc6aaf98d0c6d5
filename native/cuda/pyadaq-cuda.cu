// CPY between f32 and pyadaq's kvq and kvt types on CUDA: llama.cpp's K-shift (dequantize,
// rotate, quantize again) and ggml_cpy/ggml_cast in general. One thread per block (32 values for
// kvq, 64 for kvt, 256 for the row-trellis types' decoding), one warp per row for the row-trellis
// encoder; any strides, like upstream's cpy kernels for q4_0 and friends.

#include "pyadaq-cuda.cuh"

#define PYADAQ_CPY_BLOCK_SIZE 64

struct pyadaq_cpy_shape {
    int64_t ne;                          // elements
    int64_t ne00, ne01, ne02;            // source shape
    int64_t nb00, nb01, nb02, nb03;      // source strides (bytes)
    int64_t ne10, ne11, ne12;            // destination shape
    int64_t nb10, nb11, nb12, nb13;      // destination strides (bytes)
};

// Element i of a tensor of shape (n0, n1, n2, .) in row-major order -> (i0, i1, i2, i3).
static __device__ __forceinline__ void pyadaq_unravel(int64_t i, int64_t n0, int64_t n1, int64_t n2,
                                                      int64_t & i0, int64_t & i1, int64_t & i2, int64_t & i3) {
    i3 = i / (n0 * n1 * n2);
    i -= i3 * n0 * n1 * n2;
    i2 = i / (n0 * n1);
    i -= i2 * n0 * n1;
    i1 = i / n0;
    i0 = i - i1 * n0;
}

// QUANTIZE: f32 -> kvq, else kvq -> f32. The kvq side is addressed by block (i0 / 32 times
// the block's stride), the f32 side by value.
template <int BITS, bool QUANTIZE>
static __global__ void pyadaq_cpy_kvq(const char * __restrict__ cx, char * __restrict__ cdst, const pyadaq_cpy_shape s) {
    typedef typename pyadaq_kvq_block<BITS>::type block_t;
    const int64_t i = ((int64_t) blockDim.x * blockIdx.x + threadIdx.x) * PYADAQ_KVQ_QK;
    if (i >= s.ne) {
        return;
    }
    int64_t i00, i01, i02, i03, i10, i11, i12, i13;
    pyadaq_unravel(i, s.ne00, s.ne01, s.ne02, i00, i01, i02, i03);
    pyadaq_unravel(i, s.ne10, s.ne11, s.ne12, i10, i11, i12, i13);
    const char * src = cx + (QUANTIZE ? i00 : i00 / PYADAQ_KVQ_QK) * s.nb00 + i01 * s.nb01 + i02 * s.nb02 + i03 * s.nb03;
    char * dst = cdst + (QUANTIZE ? i10 / PYADAQ_KVQ_QK : i10) * s.nb10 + i11 * s.nb11 + i12 * s.nb12 + i13 * s.nb13;

    if constexpr (QUANTIZE) {
        float x[PYADAQ_KVQ_QK];
#pragma unroll
        for (int j = 0; j < PYADAQ_KVQ_QK; ++j) {
            x[j] = *(const float *) (src + j * s.nb00);
        }
        pyadaq_kvq_quantize_block<BITS>(x, (block_t *) dst);
    } else {
#pragma unroll
        for (int j = 0; j < PYADAQ_KVQ_QK; j += 2) {
            float v0, v1;
            pyadaq_kvq_dequant2<BITS>((const block_t *) src, j, &v0, &v1);
            *(float *) (dst + (j + 0) * s.nb10) = v0;
            *(float *) (dst + (j + 1) * s.nb10) = v1;
        }
    }
}

// The same for a transform-coded type (blocks of 64, or rows of 256 decoded by one thread).
template <int ID, bool QUANTIZE>
static __global__ void pyadaq_cpy_kvt(const char * __restrict__ cx, char * __restrict__ cdst, const pyadaq_cpy_shape s) {
    typedef typename pyadaq_kvt_block<ID>::type block_t;
    constexpr int qk = pyadaq_kvt_qk<ID>();
    static_assert(!(QUANTIZE && pyadaq_kvt_is_row<ID>()), "the row types' encoder is pyadaq_cpy_kvtr_quantize");
    const int64_t i = ((int64_t) blockDim.x * blockIdx.x + threadIdx.x) * qk;
    if (i >= s.ne) {
        return;
    }
    int64_t i00, i01, i02, i03, i10, i11, i12, i13;
    pyadaq_unravel(i, s.ne00, s.ne01, s.ne02, i00, i01, i02, i03);
    pyadaq_unravel(i, s.ne10, s.ne11, s.ne12, i10, i11, i12, i13);
    const char * src = cx + (QUANTIZE ? i00 : i00 / qk) * s.nb00 + i01 * s.nb01 + i02 * s.nb02 + i03 * s.nb03;
    char * dst = cdst + (QUANTIZE ? i10 / qk : i10) * s.nb10 + i11 * s.nb11 + i12 * s.nb12 + i13 * s.nb13;

    if constexpr (QUANTIZE) {
        float x[PYADAQ_KVT_QK];
        for (int j = 0; j < PYADAQ_KVT_QK; ++j) {
            x[j] = *(const float *) (src + j * s.nb00);
        }
        pyadaq_kvt_quantize_block<ID>(x, (block_t *) dst);
    } else {
        for (int j = 0; j < qk; j += 2) {
            float v0, v1;
            pyadaq_kvt_row_dequant2<ID>(src, j, &v0, &v1);
            *(float *) (dst + (j + 0) * s.nb10) = v0;
            *(float *) (dst + (j + 1) * s.nb10) = v1;
        }
    }
}

// f32 -> a row-trellis type: one warp (one CUDA block) per row of 256 values, the source read
// with its stride (a whole number of floats).
template <int ID>
static __global__ void __launch_bounds__(WARP_SIZE) pyadaq_cpy_kvtr_quantize(const char * __restrict__ cx, char * __restrict__ cdst,
                                                                              const pyadaq_cpy_shape s) {
    typedef typename pyadaq_kvt_block<ID>::type block_t;
    __shared__ pyadaq_kvtr_scratch scratch;
    const int64_t i = (int64_t) blockIdx.x * PYADAQ_KVTR_QK;
    int64_t i00, i01, i02, i03, i10, i11, i12, i13;
    pyadaq_unravel(i, s.ne00, s.ne01, s.ne02, i00, i01, i02, i03);
    pyadaq_unravel(i, s.ne10, s.ne11, s.ne12, i10, i11, i12, i13);
    const char * src = cx + i00 * s.nb00 + i01 * s.nb01 + i02 * s.nb02 + i03 * s.nb03;
    char * dst = cdst + (i10 / PYADAQ_KVTR_QK) * s.nb10 + i11 * s.nb11 + i12 * s.nb12 + i13 * s.nb13;
    pyadaq_kvtr_quantize_row<ID>((const float *) src, s.nb00 / (int64_t) sizeof(float), (block_t *) dst, &scratch);
}

bool pyadaq_cuda_cpy_supported(const ggml_tensor * src0, const ggml_tensor * src1) {
    const ggml_type a = src0->type;
    const ggml_type b = src1->type;
    if (!((a == GGML_TYPE_F32 && pyadaq_cuda_is_pyadaq(b)) || (pyadaq_cuda_is_pyadaq(a) && b == GGML_TYPE_F32))) {
        return false;
    }
    // one thread (or warp) per block: a block never straddles a row on either side; the row
    // types' encoder reads its source with a stride of whole floats
    const int64_t qk = ggml_blck_size(a == GGML_TYPE_F32 ? b : a);
    return src0->ne[0] % qk == 0 && src1->ne[0] % qk == 0 && (!pyadaq_cuda_is_kvtr(b) || src0->nb[0] % sizeof(float) == 0);
}

bool pyadaq_cuda_cpy(const ggml_tensor * src0, ggml_tensor * src1, cudaStream_t stream) {
    if (!pyadaq_cuda_is_pyadaq(src0->type) && !pyadaq_cuda_is_pyadaq(src1->type)) {
        return false;
    }
    GGML_ASSERT(pyadaq_cuda_cpy_supported(src0, src1)); // supports_op said so
    const int64_t ne = ggml_nelements(src0);
    GGML_ASSERT(ne == ggml_nelements(src1));

    const pyadaq_cpy_shape s = {
        ne,
        src0->ne[0], src0->ne[1], src0->ne[2],
        (int64_t) src0->nb[0], (int64_t) src0->nb[1], (int64_t) src0->nb[2], (int64_t) src0->nb[3],
        src1->ne[0], src1->ne[1], src1->ne[2],
        (int64_t) src1->nb[0], (int64_t) src1->nb[1], (int64_t) src1->nb[2], (int64_t) src1->nb[3],
    };
    const bool quantize = src0->type == GGML_TYPE_F32;
    const ggml_type t = quantize ? src1->type : src0->type;
    const int64_t n_blocks = ne / ggml_blck_size(t);
    const int64_t grid = (n_blocks + PYADAQ_CPY_BLOCK_SIZE - 1) / PYADAQ_CPY_BLOCK_SIZE;
    GGML_ASSERT(grid <= INT_MAX);

    const char * x = (const char *) src0->data;
    char * y = (char *) src1->data;
    if (quantize && pyadaq_cuda_is_kvtr(t)) {
        GGML_ASSERT(n_blocks <= INT_MAX);
        switch (t) {
#define PYADAQ_CPY_KVTR_CASE(UPPER, lower, id, ...) \
            case GGML_TYPE_##UPPER: pyadaq_cpy_kvtr_quantize<id><<<(int) n_blocks, WARP_SIZE, 0, stream>>>(x, y, s); break;
            PYADAQ_KVTR_TYPES(PYADAQ_CPY_KVTR_CASE)
#undef PYADAQ_CPY_KVTR_CASE
            default: GGML_ABORT("pyadaq_cuda_cpy: not a row type");
        }
        CUDA_CHECK(cudaGetLastError());
        return true;
    }
    void (*kernel)(const char *, char *, const pyadaq_cpy_shape) = nullptr;
    switch (t) {
        case GGML_TYPE_KVQ2: kernel = quantize ? pyadaq_cpy_kvq<2, true> : pyadaq_cpy_kvq<2, false>; break;
        case GGML_TYPE_KVQ3: kernel = quantize ? pyadaq_cpy_kvq<3, true> : pyadaq_cpy_kvq<3, false>; break;
#define PYADAQ_CPY_KVT_CASE(UPPER, lower, id, ...) \
        case GGML_TYPE_##UPPER: kernel = quantize ? pyadaq_cpy_kvt<id, true> : pyadaq_cpy_kvt<id, false>; break;
        PYADAQ_KVT_TYPES(PYADAQ_CPY_KVT_CASE)
#undef PYADAQ_CPY_KVT_CASE
#define PYADAQ_CPY_KVTR_CASE(UPPER, lower, id, ...) case GGML_TYPE_##UPPER: kernel = pyadaq_cpy_kvt<id, false>; break;
        PYADAQ_KVTR_TYPES(PYADAQ_CPY_KVTR_CASE)
#undef PYADAQ_CPY_KVTR_CASE
        default: GGML_ABORT("pyadaq_cuda_cpy: not a pyadaq type");
    }
    kernel<<<grid, PYADAQ_CPY_BLOCK_SIZE, 0, stream>>>(x, y, s);
    CUDA_CHECK(cudaGetLastError());
    return true;
}
