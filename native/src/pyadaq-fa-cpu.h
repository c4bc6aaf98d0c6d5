// pyadaq's hooks in ggml-cpu's tiled flash attention (native/src/pyadaq-fa-cpu.c, patch 0006).
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

// Whether the op's K and V go to upstream's tiled path although they are not one f16/f32 type
// (called by every thread of an op with a tile of queries or more; counts the op once).
bool pyadaq_fa_tiled(const struct ggml_compute_params * params, const struct ggml_tensor * k,
                     const struct ggml_tensor * v);
// The same decision from the types alone (the tiled kernel's own check).
bool pyadaq_fa_tiled_types(enum ggml_type k, enum ggml_type v);
// Whether rows of this type are packed by pyadaq_fa_pack_row (a quantized type with to_float).
bool pyadaq_fa_packs(enum ggml_type type);
// Dequantizes one row of n values into dst[0], dst[stride], ..., dst[(n-1)*stride].
void pyadaq_fa_pack_row(enum ggml_type type, const void * src, float * dst, int64_t stride, int64_t n);

#ifdef __cplusplus
}
#endif
