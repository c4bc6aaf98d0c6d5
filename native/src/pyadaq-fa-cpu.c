// CPU flash attention with quantized K/V caches on upstream's tiled path.
//
// ggml-cpu's tiled flash attention (prompt processing: a tile of 64 queries or more) packs each
// tile of 64 K and V rows into f32 tile buffers, which the graph plan sizes in the op's work
// buffer, and multiplies them with f32 GEMMs. Upstream packs only f16 and f32 rows of one type
// and sends every other K/V pair to the per-row path, which dequantizes every V row once per
// query row (and per query head of a GQA group). Patch 0006 lets the tiled path take K and V of
// any quantized type with a to_float, pyadaq's and upstream's, in any pairing with each other and
// with f16/f32: each row is dequantized into the tile buffer as its tile is packed. Nothing is
// allocated beyond upstream's tile buffers and a row on the stack, so the scratch does not grow
// with the context. Generation (one query) keeps the per-row path.
//
// PYADAQ_FA_TILED=0 switches it off (the per-row path then runs, as upstream).

#include "pyadaq-fa-cpu.h"
#include "pyadaq-quants.h"

#include "ggml-cpu-impl.h"
#include "ggml-impl.h"

#include <stdlib.h>
#include <string.h>

// longest row packed through the stack (K head sizes of current models are at most 576)
#define PYADAQ_FA_MAX_ROW 4096

static int64_t g_tiled;  // ops with a quantized K or V run on the tiled path (for the tests)

int64_t pyadaq_cpu_fa_tiled(void) {
    return __atomic_load_n(&g_tiled, __ATOMIC_RELAXED);
}

static int enabled(void) {
    static int on = -1;
    if (on < 0) {
        const char * e = getenv("PYADAQ_FA_TILED");
        on = !(e && e[0] == '0');
    }
    return on;
}

bool pyadaq_fa_packs(enum ggml_type type) {
    if (type == GGML_TYPE_F16 || type == GGML_TYPE_F32 || !ggml_is_quantized(type)) {
        return false;
    }
    return ggml_get_type_traits(type)->to_float != NULL;
}

static bool packable(enum ggml_type type) {
    return type == GGML_TYPE_F16 || type == GGML_TYPE_F32 || pyadaq_fa_packs(type);
}

bool pyadaq_fa_tiled_types(enum ggml_type k, enum ggml_type v) {
    return enabled() && packable(k) && packable(v) && (pyadaq_fa_packs(k) || pyadaq_fa_packs(v) || k != v);
}

bool pyadaq_fa_tiled(const struct ggml_compute_params * params, const struct ggml_tensor * k,
                     const struct ggml_tensor * v) {
    if (!pyadaq_fa_tiled_types(k->type, v->type) || k->ne[0] > PYADAQ_FA_MAX_ROW) {
        return false;
    }
    if (params->ith == 0) {
        __atomic_add_fetch(&g_tiled, 1, __ATOMIC_RELAXED);
    }
    return true;
}

void pyadaq_fa_pack_row(enum ggml_type type, const void * src, float * dst, int64_t stride, int64_t n) {
    ggml_to_float_t to_float = ggml_get_type_traits(type)->to_float;
    if (stride == 1) {
        to_float(src, dst, n);
        return;
    }
    float row[PYADAQ_FA_MAX_ROW];
    to_float(src, row, n);
    for (int64_t i = 0; i < n; ++i) {
        dst[i * stride] = row[i];
    }
}
