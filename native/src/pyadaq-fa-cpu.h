// pyadaq's hook in ggml-cpu's flash attention (native/src/pyadaq-fa-cpu.c, patch 0006).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;
struct ggml_tensor;

// When K or V of the op is a pyadaq type and f16 K/V would take upstream's tiled path (at least
// q_tile queries): every thread converts its share of the K and V views
// to f16 scratch, and *alias becomes dst with those as sources; returns 1. Otherwise 0.
int pyadaq_fa_convert_kv(const struct ggml_compute_params * params, const struct ggml_tensor * dst, int q_tile,
                         struct ggml_tensor * alias, struct ggml_tensor * k16, struct ggml_tensor * v16);

#ifdef __cplusplus
}
#endif
