// pyadaq's flash attention for quantized K/V caches on the CPU (native/src/pyadaq-fa-cpu.cpp),
// called from ggml-cpu through patch 0006.
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

// Computes the flash-attention op dst and returns true when it is pyadaq's to compute: a tile of
// queries or more and a quantized K or V (or f16 and f32 mixed), or a short batch (generation) with
// a quantized V. Called by every thread of the op; returns false,
// having done nothing, otherwise.
bool pyadaq_fa_tiled(const struct ggml_compute_params * params, struct ggml_tensor * dst);
// The work-buffer bytes that pyadaq_fa_tiled needs for this op with n_tasks threads (0 when it
// does not take the op), for the graph plan.
size_t pyadaq_fa_tiled_work_size(const struct ggml_tensor * node, int n_tasks);

#ifdef __cplusplus
}
#endif
