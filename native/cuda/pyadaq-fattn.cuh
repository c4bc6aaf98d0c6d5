// pyadaq's kvq and kvt types in the CUDA flash-attention vector kernel: the K.Q dot product and
// the V dequantization. Included by fattn-common.cuh (patch 0007) after its vec_dot_KQ_t and
// dequantize_V_t typedefs, next to upstream's functions of the same shape.

#pragma once

#include "pyadaq-cuda.cuh"

// ---- flash attention, vector kernel ---------------------------------------------------------

// K.Q for one K row: each thread takes ints k_KQ of Q (4 values each) as the q8_0 kernel does;
// the int8 levels of the same 4 K values go through dp4a, then one multiply by both scales.
template <int D, int nthreads, int BITS>
static __device__ __forceinline__ float pyadaq_vec_dot_fattn_vec_KQ_kvq(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {

    typedef typename pyadaq_kvq_block<BITS>::type block_t;
    const block_t * K = (const block_t *) K_c;
    GGML_UNUSED(Q_v);
    static_assert(D % PYADAQ_KVQ_QK == 0, "head size must be a multiple of the kvq block");

    float sum = 0.0f;

#pragma unroll
    for (int k_KQ_0 = 0; k_KQ_0 < int(D/sizeof(int)); k_KQ_0 += nthreads) {
        const int k_KQ = k_KQ_0 + (nthreads == WARP_SIZE ? threadIdx.x : threadIdx.x % nthreads);

        const int ib = k_KQ / QI8_0;
        const int j0 = 4 * (k_KQ % QI8_0);

        const int v    = pyadaq_kvq_get_levels4<BITS>(K + ib, j0);
        const int sumi = ggml_cuda_dp4a(v, Q_q8[k_KQ_0/nthreads], 0);

        const float2 Q_ds = ((const float2 *) Q_ds_v)[k_KQ_0/nthreads];
        sum += pyadaq_f16_to_f32(K[ib].d) * Q_ds.x * (float) sumi;
    }

    return sum;
}

// ne values of one V row starting at i0 (ne = 2 or 4, i0 % ne == 0), as half or float.
template <typename T, int ne, int BITS>
static __device__ __forceinline__ void pyadaq_dequantize_V_kvq(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    typedef typename pyadaq_kvq_block<BITS>::type block_t;
    const block_t * x = (const block_t *) vx;
    static_assert(ne == 2 || ne == 4, "bad ne");

    const int64_t ib = i0 / PYADAQ_KVQ_QK;
    const int     j0 = i0 % PYADAQ_KVQ_QK;

    int q = pyadaq_kvq_get_levels4<BITS>(x + ib, j0 & ~3);
    if constexpr (ne == 2) {
        q >>= 8 * (j0 & 2);
    }
    const int8_t * q8 = (const int8_t *) &q;

#ifdef FP16_AVAILABLE
    if constexpr (std::is_same_v<T, half>) {
        const half2 d = __half2half2(__ushort_as_half(x[ib].d));
#pragma unroll
        for (int l0 = 0; l0 < ne; l0 += 2) {
            ((half2 *) dst)[l0/2] = d * make_half2(q8[l0 + 0], q8[l0 + 1]);
        }
    } else
#endif // FP16_AVAILABLE
    if constexpr (std::is_same_v<T, float>) {
        const float d = pyadaq_f16_to_f32(x[ib].d);
#pragma unroll
        for (int l = 0; l < ne; ++l) {
            ((float *) dst)[l] = d * q8[l];
        }
    } else {
        static_assert(std::is_same_v<T, void>, "bad type");
    }
}

// K.Q for one K row of a transform-coded type (kvt or row-trellis), with Q as the f16 K path has it (fattn-vec.cuh's
// K_float_Q, patch 0007), not rounded to q8_1: whitened keys weigh Q's small components as much
// as its large ones, and one int8 scale per 32 values of Q lost them (on the CPU, generation with
// kvt keys fell into repeated digits until Q stayed in float there too). Each thread takes the
// pairs of K values that the f16 path's Q registers hold: cpy_ne pairs per step, nthreads steps
// apart; each pair is d * level, as the reference computes it.
template <int D, int nthreads, int ID>
static __device__ __forceinline__ float pyadaq_vec_dot_fattn_vec_KQ_kvt(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {

    GGML_UNUSED(Q_q8);
    GGML_UNUSED(Q_ds_v);
    static_assert(D % pyadaq_kvt_qk<ID>() == 0, "head size must be a multiple of the type's block");

    constexpr int cpy_nb = ggml_cuda_get_max_cpy_bytes();
    constexpr int cpy_ne = cpy_nb / 4;

    float sum = 0.0f;

#pragma unroll
    for (int k_KQ_0 = 0; k_KQ_0 < D/2; k_KQ_0 += nthreads*cpy_ne) {
#pragma unroll
        for (int k_KQ_1 = 0; k_KQ_1 < cpy_ne; ++k_KQ_1) {
            const int i = 2 * (k_KQ_0 + (threadIdx.x % nthreads)*cpy_ne + k_KQ_1);  // the pair's first value
            float a, b;
            pyadaq_kvt_row_dequant2<ID>(K_c, i, &a, &b);
#ifdef V_DOT2_F32_F16_AVAILABLE
            const float2 q = __half22float2(((const half2 *) Q_v)[k_KQ_0/nthreads + k_KQ_1]);
#else
            const float2 q = ((const float2 *) Q_v)[k_KQ_0/nthreads + k_KQ_1];
#endif // V_DOT2_F32_F16_AVAILABLE
            sum += a * q.x + b * q.y;
        }
    }

    return sum;
}

// ne values of one V row of a transform-coded type starting at i0 (ne = 2 or 4, i0 % ne == 0:
// one group of 8), as half or float: d * level (d * table entry for a row type's trellis widths)
// as the reference computes it, 0 for a width of 0.
template <typename T, int ne, int ID>
static __device__ __forceinline__ void pyadaq_dequantize_V_kvt(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    static_assert(ne == 2 || ne == 4, "bad ne");

    float v[ne];
#pragma unroll
    for (int l = 0; l < ne; l += 2) {
        pyadaq_kvt_row_dequant2<ID>(vx, i0 + l, &v[l], &v[l + 1]);
    }
#ifdef FP16_AVAILABLE
    if constexpr (std::is_same_v<T, half>) {
#pragma unroll
        for (int l0 = 0; l0 < ne; l0 += 2) {
            ((half2 *) dst)[l0/2] = make_half2(__float2half(v[l0 + 0]), __float2half(v[l0 + 1]));
        }
    } else
#endif // FP16_AVAILABLE
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
        for (int l = 0; l < ne; ++l) {
            ((float *) dst)[l] = v[l];
        }
    } else {
        static_assert(std::is_same_v<T, void>, "bad type");
    }
}

// Branches for fattn-common.cuh's get_vec_dot_KQ / get_dequantize_V.
template <ggml_type type_K, int D, int nthreads>
constexpr __device__ vec_dot_KQ_t pyadaq_get_vec_dot_KQ() {
    if constexpr (pyadaq_cuda_is_kvt(type_K)) {
        return pyadaq_vec_dot_fattn_vec_KQ_kvt<D, nthreads, (int) type_K>;
    } else {
        return pyadaq_vec_dot_fattn_vec_KQ_kvq<D, nthreads, pyadaq_cuda_kvq_bits(type_K)>;
    }
}
template <ggml_type type_V, typename T, int ne>
constexpr __device__ dequantize_V_t pyadaq_get_dequantize_V() {
    if constexpr (pyadaq_cuda_is_kvt(type_V)) {
        return pyadaq_dequantize_V_kvt<T, ne, (int) type_V>;
    } else {
        return pyadaq_dequantize_V_kvq<T, ne, pyadaq_cuda_kvq_bits(type_V)>;
    }
}
