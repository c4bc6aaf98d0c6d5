// CPU flash attention with pyadaq's cache types: K and V converted to f16 once per op.
//
// ggml-cpu's flash attention runs its fast paths (tiled for prompt processing, split-KV for
// generation) only for f16/f32 K and V of the same type; any other type takes the per-row
// path, which dequantizes every V row once per query row (and per query head of a GQA
// group). When K or V is a pyadaq type and the batch holds at least a tile of queries (prompt
// processing), pyadaq_fa_convert_kv() dequantizes the K and V views once into f16 scratch
// tensors, and the op then runs on those with upstream's tiled f16 path (native/patches/0006
// adds the call). PYADAQ_FA_CONVERT=0 switches it off.

#include "pyadaq-fa-cpu.h"
#include "pyadaq-quants.h"

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// The f16 copies live in a buffer of the thread that runs as thread 0 of the op (the thread that
// called ggml_graph_compute), reused and grown from op to op. Thread 0 publishes it for the
// other threads of its threadpool in a small table for the length of one op only, so that
// nothing stays behind when contexts and threadpools come and go.
#define PYADAQ_FA_SLOTS 64

static _Thread_local void * t_buf;
static _Thread_local size_t t_buf_size;

static struct {
    const void * pool;
    const void * op;
    void * data;
} g_slots[PYADAQ_FA_SLOTS];
static pthread_mutex_t g_slots_mutex = PTHREAD_MUTEX_INITIALIZER;

static void * own_buffer(size_t size) {
    if (t_buf_size < size) {
        void * p = realloc(t_buf, size);
        if (p == NULL) {
            return NULL;
        }
        t_buf = p;
        t_buf_size = size;
    }
    return t_buf;
}

static void publish(const void * pool, const void * op, void * data) {
    pthread_mutex_lock(&g_slots_mutex);
    for (int i = 0; i < PYADAQ_FA_SLOTS; ++i) {
        if (g_slots[i].pool == NULL) {
            g_slots[i].pool = pool;
            g_slots[i].op = op;
            g_slots[i].data = data;
            break;
        }
    }
    pthread_mutex_unlock(&g_slots_mutex);
}

// the published buffer of (pool, op), or NULL; remove: also take the entry out
static void * lookup(const void * pool, const void * op, int remove) {
    void * out = NULL;
    pthread_mutex_lock(&g_slots_mutex);
    for (int i = 0; i < PYADAQ_FA_SLOTS; ++i) {
        if (g_slots[i].pool == pool && g_slots[i].op == op) {
            out = g_slots[i].data;
            if (remove) {
                g_slots[i].pool = NULL;
                g_slots[i].op = NULL;
                g_slots[i].data = NULL;
            }
            break;
        }
    }
    pthread_mutex_unlock(&g_slots_mutex);
    return out;
}

static int64_t g_converted;  // ops run on f16 copies (for the tests)

int64_t pyadaq_cpu_fa_converted(void) {
    return __atomic_load_n(&g_converted, __ATOMIC_RELAXED);
}

static int convert_enabled(void) {
    static int enabled = -1;
    if (enabled < 0) {
        const char * e = getenv("PYADAQ_FA_CONVERT");
        enabled = !(e && e[0] == '0');
    }
    return enabled;
}

// an f16 copy of the 4-D view t, contiguous, in `data`; rows [r0, r1) of ne1*ne2*ne3
static void convert_rows(const struct ggml_tensor * t, ggml_fp16_t * data, int64_t r0, int64_t r1) {
    const int64_t ne0 = t->ne[0];
    const int64_t ne1 = t->ne[1];
    const int64_t ne2 = t->ne[2];
    ggml_to_float_t to_float = ggml_get_type_traits(t->type)->to_float;
    float tmp[1024];
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t i1 = r % ne1;
        const int64_t i2 = (r / ne1) % ne2;
        const int64_t i3 = r / (ne1 * ne2);
        const char * src = (const char *) t->data + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
        if (t->type == GGML_TYPE_F16) {
            memcpy(data + r * ne0, src, ne0 * sizeof(ggml_fp16_t));
        } else {
            to_float(src, tmp, ne0);
            ggml_cpu_fp32_to_fp16(tmp, data + r * ne0, ne0);
        }
    }
}

static void make_f16_view(struct ggml_tensor * out, const struct ggml_tensor * t, void * data) {
    *out = *t;
    out->type = GGML_TYPE_F16;
    out->data = data;
    out->view_src = NULL;
    out->view_offs = 0;
    out->nb[0] = sizeof(ggml_fp16_t);
    out->nb[1] = out->nb[0] * t->ne[0];
    out->nb[2] = out->nb[1] * t->ne[1];
    out->nb[3] = out->nb[2] * t->ne[2];
}

// Called by every thread of the op (q_tile: upstream's ggml_fa_tile_config::Q). Returns 1 and
// fills *alias (a copy of dst whose K and V sources are f16 scratch tensors in *k16 / *v16)
// when the op has a pyadaq K or V type and at least q_tile queries.
int pyadaq_fa_convert_kv(const struct ggml_compute_params * params, const struct ggml_tensor * dst, int q_tile,
                         struct ggml_tensor * alias, struct ggml_tensor * k16, struct ggml_tensor * v16) {
    const struct ggml_tensor * q = dst->src[0];
    const struct ggml_tensor * k = dst->src[1];
    const struct ggml_tensor * v = dst->src[2];
    if (!convert_enabled() || !(pyadaq_is_pyadaq_type(k->type) || pyadaq_is_pyadaq_type(v->type))) {
        return 0;
    }
    // Only where f16 K/V then take upstream's tiled path (a tile of queries or more). Below it
    // the per-row path stays: with f16 V it would accumulate in f16; and for generation (one
    // query) converting the whole cache every token costs more than it saves (measured on
    // Gemma 3 270M at depth 4096: 0.79x f16/f16 with the conversion, 0.94x without).
    if (q->ne[1] < q_tile) {
        return 0;
    }
    if (k->ne[0] > 1024 || v->ne[0] > 1024 || q->type != GGML_TYPE_F32) {
        return 0;
    }
    const int64_t rows_k = k->ne[1] * k->ne[2] * k->ne[3];
    const int64_t rows_v = v->ne[1] * v->ne[2] * v->ne[3];
    const size_t bytes_k = (size_t) (rows_k * k->ne[0]) * sizeof(ggml_fp16_t);
    const size_t bytes_v = (size_t) (rows_v * v->ne[0]) * sizeof(ggml_fp16_t);
    const int ith = params->ith;
    if (ith == 0) {
        publish(params->threadpool, dst, own_buffer(bytes_k + bytes_v));
    }
    ggml_barrier(params->threadpool);  // published (a NULL or missing entry: nobody converts)
    char * buf = lookup(params->threadpool, dst, 0);
    ggml_barrier(params->threadpool);  // everyone has read the entry
    if (ith == 0) {
        lookup(params->threadpool, dst, 1);
    }
    if (buf == NULL) {
        return 0;
    }
    const int nth = params->nth;
    const int64_t rows = rows_k + rows_v;
    const int64_t per = (rows + nth - 1) / nth;
    const int64_t r0 = ith * per;
    const int64_t r1 = r0 + per < rows ? r0 + per : rows;
    ggml_fp16_t * kd = (ggml_fp16_t *) buf;
    ggml_fp16_t * vd = (ggml_fp16_t *) (buf + bytes_k);
    if (r0 < rows_k) {
        convert_rows(k, kd, r0, r1 < rows_k ? r1 : rows_k);
    }
    if (r1 > rows_k) {
        convert_rows(v, vd, (r0 > rows_k ? r0 : rows_k) - rows_k, r1 - rows_k);
    }
    make_f16_view(k16, k, kd);
    make_f16_view(v16, v, vd);
    *alias = *dst;
    alias->src[1] = k16;
    alias->src[2] = v16;
    if (ith == 0) {
        __atomic_add_fetch(&g_converted, 1, __ATOMIC_RELAXED);
    }
    ggml_barrier(params->threadpool);  // the copies are complete before anyone reads them
    return 1;
}
