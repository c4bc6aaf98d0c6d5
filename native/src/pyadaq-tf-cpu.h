// The CPU side of pyadaq's K/V transforms (native/src/pyadaq-kv-transform.cpp, in libllama): the
// values' forward product x . M for a few tokens with M stored by rows in f16, as a ggml custom op
// (ggml's f16 out_prod converts every row of M with ggml-base's scalar conversion on each call).
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// A ggml_custom_op_t. dst [d, heads, tokens] f32 (contiguous) = for each token t and head h,
// x[:, h, t] . M_h, i.e. dst[m, h, t] = sum_k x[k, h, t] M_h[k][m], where dst->src[0] [d, d, heads]
// (f16, contiguous; f32 matrices take ggml's out_prod) holds M_h by rows (row k of head h: M_h[k][0..d)) and dst->src[1]
// [d, heads, tokens] f32 is x (each row of d contiguous). Threads take (token, head, 64 columns).
void pyadaq_cpu_rows_product(struct ggml_tensor * dst, int ith, int nth, void * userdata);

#ifdef __cplusplus
}
#endif
