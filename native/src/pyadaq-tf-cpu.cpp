// See pyadaq-tf-cpu.h.

#include "pyadaq-tf-cpu.h"

#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "vec.h"

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t ROWS_PRODUCT_CHUNK = 64;  // output columns per unit of work
static_assert(ROWS_PRODUCT_CHUNK % 16 == 0, "whole SIMD registers per chunk");

}  // namespace

void pyadaq_cpu_rows_product(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const ggml_tensor * m = dst->src[0];
    const ggml_tensor * x = dst->src[1];
    const int64_t d = m->ne[0];
    const int64_t heads = m->ne[2];
    const int64_t tokens = x->ne[2];
    GGML_ASSERT(m->type == GGML_TYPE_F16);
    GGML_ASSERT(x->type == GGML_TYPE_F32 && dst->type == GGML_TYPE_F32);
    GGML_ASSERT(m->ne[1] == d && ggml_is_contiguous(m));
    GGML_ASSERT(x->ne[0] == d && x->ne[1] == heads && x->nb[0] == sizeof(float));
    GGML_ASSERT(dst->ne[0] == d && dst->ne[1] == heads && dst->ne[2] == tokens && ggml_is_contiguous(dst));

    const int64_t chunks = (d + ROWS_PRODUCT_CHUNK - 1) / ROWS_PRODUCT_CHUNK;
    const int64_t units = tokens * heads * chunks;
    const int64_t per = (units + nth - 1) / nth;
    const int64_t u0 = per * ith;
    const int64_t u1 = std::min(units, u0 + per);
    const size_t row_bytes = m->nb[1];
    float acc[ROWS_PRODUCT_CHUNK];
    float row[ROWS_PRODUCT_CHUNK];
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t c = u % chunks;
        const int64_t h = (u / chunks) % heads;
        const int64_t t = u / (chunks * heads);
        const int64_t c0 = c * ROWS_PRODUCT_CHUNK;
        const int n = (int) std::min(ROWS_PRODUCT_CHUNK, d - c0);
        const float * xr = (const float *) ((const char *) x->data + h * x->nb[1] + t * x->nb[2]);
        const char * mh = (const char *) m->data + h * m->nb[2];
        std::memset(acc, 0, sizeof(acc));
        for (int64_t k = 0; k < d; ++k) {
            const float xk = xr[k];
            if (xk == 0.0f) {
                continue;
            }
            ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) (mh + k * row_bytes) + c0, row, n);
            ggml_vec_mad_f32(n, acc, row, xk);
        }
        float * out = (float *) ((char *) dst->data + c0 * sizeof(float) + h * dst->nb[1] + t * dst->nb[2]);
        std::memcpy(out, acc, (size_t) n * sizeof(float));
    }
}
