// Calibrated K/V transforms in libllama (see pyadaq-kv-transform.h for the identities): the
// exported entry points that hand a calibration to the next context, and the hooks that
// llama_kv_cache, build_attn, the K-shift and llama_free call (native/patches/0010).

#include "llama.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "pyadaq-kv-transform.h"
#include "pyadaq-quants.h"
#include "pyadaq-tf-cpu.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

extern "C" {

// One layer's K (is_v = 0) or V (is_v = 1) transform for the next context created on the
// calling thread (it joins that thread's slot of next-context settings, pyadaq-llama.cpp): per
// KV head h, the orthonormal head_size x head_size matrix M[h] whose columns are the cache's
// coordinates (row-major: matrix[(h * d + i) * d + j] is coordinate j's i-th component), the
// scales s[h] (head_size values; NULL: all 1), the mean[h] (head_size values; NULL: none) and
// the inverse N[h] of M[h] (the same layout; NULL: M is orthonormal and N = M^T). The cache
// then holds x~ = ((x - mean) . M) / s, queries become q . N^T * s (keys: q~ . k~ = q . (k - mean)),
// and attention's output out~ goes back as (out~ * s) . N + mean (values). matrix NULL: M is the
// identity, which nothing multiplies (scale and inverse must then be NULL and mean given: the
// part only takes out the mean; llama.cpp's own rotation, if on, still applies after it).
// Returns 0, or -1 with a message in err (may be NULL) and nothing stored for a bad argument, a
// scale <= 0 or a value that is not finite. A layer given twice keeps the last call.
PYADAQ_API int32_t pyadaq_next_context_kv_transform(int32_t il, int32_t is_v, int32_t n_head, int32_t head_size,
                                                    const float * matrix, const float * scale,
                                                    const float * mean, const float * inverse, char * err,
                                                    size_t err_size);
// Layers of a context whose K or V cache is stored transformed (0: an uncalibrated context).
PYADAQ_API int32_t pyadaq_kv_transform_layers(const struct llama_context * ctx);
// Bytes of the device buffers that hold a context's transforms (0 without a calibration).
PYADAQ_API int64_t pyadaq_kv_transform_bytes(const struct llama_context * ctx);
// Which offsets layer il of the model lets a transform take out: bit 0 the keys' (it shifts every
// logit of a query alike, which softmax ignores, unless the logits are soft-capped or the layer
// has learned attention sinks), bit 1 the values' (it comes back whole because the attention
// weights sum to one, unless sinks take part of them). An offset given for a layer that does
// not let it out is kept in the data (not subtracted). -1: no such layer.
PYADAQ_API int32_t pyadaq_model_kv_offsets(const struct llama_model * model, int32_t il);

}

// one side (K or V) of a layer's transform, as ggml_mul_mat's first operands
struct pyadaq_kv_part {
    bool on = false;               // the side is stored transformed (else nothing below is set)
    int64_t d = 0;                 // head size
    ggml_tensor * u = nullptr;     // [d, d, n_head_kv]: row j of head h is column j of M, so that
                                   // mul_mat(u, x) gives x . M; with `rows`, row j is row j of M;
                                   // nullptr: M is the identity (only the mean comes out)
    bool rows = false;             // u holds M row by row (see forward and inverse)
    ggml_tensor * mean = nullptr;  // [d, n_head_kv]: the mean taken out (nullptr: kept)
    ggml_tensor * s = nullptr;     // [d, n_head_kv]: the scales (nullptr: all 1)
    ggml_tensor * n = nullptr;     // [d, d, n_head_kv]: row i is column i of N (nullptr: N = M^T)
};

struct pyadaq_kv_transform {
    ggml_context_ptr ctx;
    ggml_backend_buffer_ptr buf;
    pyadaq_kv_part k, v;  // k.on / v.on false: that side is not transformed
    // queries of a key transform with an explicit inverse: q . N^T, as mul_mat's first operand
    // (the rows of N); nullptr: k.u
    ggml_tensor * q = nullptr;
    int64_t n_head_kv = 0;
    const ggml_tensor * cache = nullptr;  // the layer's K cache tensor, the registry's key
};

namespace pyadaq_tf {

struct layer_calib {
    int32_t n_head = 0;
    int32_t d = 0;
    std::vector<float> basis;  // as given: [h][i][j], columns are directions; empty: the identity
    std::vector<float> scale;    // empty: all 1
    std::vector<float> mean;     // empty: none
    std::vector<float> inverse;  // empty: the transpose of basis
};

struct calib_set {
    std::map<int32_t, layer_calib> part[2];  // [is_v][il]

    bool empty() const { return part[0].empty() && part[1].empty(); }
};

thread_local calib_set t_pending;
thread_local std::unique_ptr<calib_set> t_calib;
thread_local std::vector<std::shared_ptr<pyadaq_kv_transform>> t_made;  // for the context being built

std::mutex g_mutex;
std::map<const ggml_tensor *, std::shared_ptr<pyadaq_kv_transform>> g_by_cache;  // key: the layer's K tensor
std::map<const llama_context *, std::vector<std::shared_ptr<pyadaq_kv_transform>>> g_by_ctx;
std::atomic<int64_t> g_live{ 0 };  // g_by_cache.size(), readable without the lock

void tf_set_err(char * err, size_t err_size, const std::string & msg) {
    if (err != nullptr && err_size > 0) {
        snprintf(err, err_size, "%s", msg.c_str());
    }
}

void forget(const std::vector<std::shared_ptr<pyadaq_kv_transform>> & tfs) {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (const auto & tf : tfs) {
        auto it = g_by_cache.find(tf->cache);
        if (it != g_by_cache.end() && it->second == tf) {
            g_by_cache.erase(it);
        }
    }
    g_live = (int64_t) g_by_cache.size();
}

std::shared_ptr<pyadaq_kv_transform> find(const ggml_tensor * cache) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_by_cache.find(cache);
    return it == g_by_cache.end() ? nullptr : it->second;
}

// y [d, tokens, heads] times (mul) or divided by (div) the per-KV-head scales s [d, n_head_kv];
// query head h = g * group + j belongs to KV head g
ggml_tensor * scaled(ggml_context * ctx, ggml_tensor * y, ggml_tensor * s, bool mul) {
    const int64_t d = y->ne[0];
    const int64_t nkv = s->ne[1];
    ggml_tensor * y4 = ggml_reshape_4d(ctx, y, d, y->ne[1], y->ne[2] / nkv, nkv);
    ggml_tensor * s4 = ggml_reshape_4d(ctx, s, d, 1, 1, nkv);
    y4 = mul ? ggml_mul(ctx, y4, s4) : ggml_div(ctx, y4, s4);
    return ggml_reshape_3d(ctx, y4, d, y->ne[1], y->ne[2]);
}

// One token's x [d, heads, 1] (contiguous) -> x . A op s per head, [d, heads, 1], A = a as
// mul_mat's first operand [d, d, n_head_kv]: with one token the heads of a KV head's group are
// neighbours in memory, so x is [d, group, n_head_kv] as it lies and each KV head's matrix is read
// once for its whole group (the batched path's permutation multiplies every query head by its own
// copy of the product: a matrix-vector product per head, and a copy of the result). scale_first:
// s applies to x before the product (the inverse), else to the product (forward).
ggml_tensor * one_token(ggml_context * ctx, ggml_tensor * x, ggml_tensor * a, ggml_tensor * s, bool mul_scale,
                        bool scale_first = false) {
    const int64_t d = x->ne[0];
    const int64_t heads = x->ne[1];
    const int64_t nkv = a->ne[2];
    GGML_ASSERT(x->ne[2] == 1 && heads % nkv == 0 && ggml_is_contiguous(x));
    ggml_tensor * y = ggml_reshape_3d(ctx, x, d, heads / nkv, nkv);
    ggml_tensor * s3 = s != nullptr ? ggml_reshape_3d(ctx, s, d, 1, nkv) : nullptr;
    if (s3 != nullptr && scale_first) {
        y = mul_scale ? ggml_mul(ctx, y, s3) : ggml_div(ctx, y, s3);
    }
    y = ggml_mul_mat(ctx, a, y);
    if (s3 != nullptr && !scale_first) {
        y = mul_scale ? ggml_mul(ctx, y, s3) : ggml_div(ctx, y, s3);
    }
    return ggml_reshape_3d(ctx, y, d, heads, 1);
}

// A batch of at most this many tokens takes x . M from M stored by rows with out_prod (which
// contracts its operands' rows), or where M is f16 with pyadaq_cpu_rows_product (ggml's f16
// out_prod converts all of M on every call with ggml-base's scalar conversion); a larger one
// copies M transposed and uses mul_mat's blocked kernels, the copy shared by the batch's tokens.
// (In generation the copy of M, 256 KiB a layer on the embedded model, cost more than the
// product itself.)
constexpr int64_t PYADAQ_TF_OUT_PROD_TOKENS = 32;

// x [d, heads, tokens] -> ((x - mean) . M) op s per head, [d, heads, tokens] contiguous; heads is
// a multiple of the matrices' head count (query heads: their group's KV head); op: * for
// queries (mul_scale), / for keys and values. u: M as mul_mat's first operand, or M by rows
// (rows: the values' layout, which the inverse uses as it is).
ggml_tensor * forward(ggml_context * ctx, ggml_tensor * x, ggml_tensor * u, ggml_tensor * mean, ggml_tensor * s,
                      bool mul_scale, bool rows = false) {
    if (u == nullptr) {  // the identity: the mean alone (no scales with it)
        GGML_ASSERT(s == nullptr);
        if (mean == nullptr) {
            return x;
        }
        GGML_ASSERT(x->ne[0] == mean->ne[0] && x->ne[1] == mean->ne[1] && x->ne[3] == 1);
        return ggml_sub(ctx, x, ggml_reshape_3d(ctx, mean, mean->ne[0], mean->ne[1], 1));
    }
    const int64_t d = u->ne[0];
    GGML_ASSERT(x->ne[0] == d && x->ne[3] == 1);
    if (mean != nullptr) {
        GGML_ASSERT(x->ne[1] == mean->ne[1]);
        x = ggml_sub(ctx, x, ggml_reshape_3d(ctx, mean, d, mean->ne[1], 1));
    }
    if (!rows && x->ne[2] == 1 && ggml_is_contiguous(x)) {
        return one_token(ctx, x, u, s, mul_scale);
    }
    if (rows && u->type == GGML_TYPE_F16 && x->ne[2] <= PYADAQ_TF_OUT_PROD_TOKENS) {
        // f16 rows of M (the values' matrices on the CPU): pyadaq's product, in x's own layout
        GGML_ASSERT(x->type == GGML_TYPE_F32 && x->ne[1] == u->ne[2]);
        ggml_tensor * args[2] = { u, x->nb[0] == sizeof(float) ? x : ggml_cont(ctx, x) };
        ggml_tensor * y = ggml_custom_4d(ctx, GGML_TYPE_F32, d, x->ne[1], x->ne[2], 1, args, 2,
                                         pyadaq_cpu_rows_product, GGML_N_TASKS_MAX, nullptr);
        return s == nullptr ? y : ggml_div(ctx, y, ggml_reshape_3d(ctx, s, d, s->ne[1], 1));
    }
    ggml_tensor * xp = ggml_permute(ctx, x, 0, 2, 1, 3);  // [d, tokens, heads]
    ggml_tensor * y = nullptr;
    if (!rows) {
        y = ggml_mul_mat(ctx, u, xp);
    } else if (x->ne[2] <= PYADAQ_TF_OUT_PROD_TOKENS) {
        // y[m, t] = sum_k M[k][m] x[k, t]: out_prod(u, x^T) sums over both operands' rows
        y = ggml_out_prod(ctx, u, ggml_cont(ctx, ggml_transpose(ctx, xp)));
    } else {
        y = ggml_mul_mat(ctx, ggml_cont(ctx, ggml_transpose(ctx, u)), xp);
    }
    if (s != nullptr) {
        y = scaled(ctx, y, s, mul_scale);
    }
    // A copy even where the permutation moves only dimensions of size 1 (one KV head) and a
    // reshape would do: with reshaped views of the permuted tensors here (36c299e..701e040)
    // generation on the embedded model read wrong queries and keys (graph memory reused under
    // the views; the tiny test models did not show it; test_embedded.py checks generation now).
    // One token takes one_token instead, which reshapes contiguous tensors (its input and the
    // product's result), not views of permuted ones; test_calibrated_generation passes with it.
    return ggml_cont(ctx, ggml_permute(ctx, y, 0, 2, 1, 3));
}

// x~ [d, heads, tokens] -> (x~ * s) . N per head, contiguous (the mean is added by the caller);
// N as mul_mat's first operand: part.n, else M^T (part.u by rows as it is, or transposed)
ggml_tensor * inverse(ggml_context * ctx, ggml_tensor * x, const pyadaq_kv_part & part) {
    GGML_ASSERT(x->ne[0] == part.d && x->ne[3] == 1);
    if (part.u == nullptr) {
        return x;  // the identity
    }
    ggml_tensor * ut = part.n != nullptr ? part.n
                       : part.rows       ? part.u
                                         : ggml_cont(ctx, ggml_transpose(ctx, part.u));  // rows of M: x~ . M^T
    if (x->ne[2] == 1 && ggml_is_contiguous(x)) {
        return one_token(ctx, x, ut, part.s, true, true);
    }
    ggml_tensor * p = ggml_permute(ctx, x, 0, 2, 1, 3);  // [d, tokens, heads]
    if (part.s != nullptr) {
        p = scaled(ctx, ggml_cont(ctx, p), part.s, true);
    }
    ggml_tensor * y = ggml_mul_mat(ctx, ut, p);
    return ggml_cont(ctx, ggml_permute(ctx, y, 0, 2, 1, 3));
}

// per head, the transpose of a d x d row-major matrix: row j of the result is column j of the
// input, the layout of ggml_mul_mat's first operand
std::vector<float> transposed(const std::vector<float> & m, int32_t n_head, int32_t d) {
    const size_t dd = (size_t) d;
    std::vector<float> out(m.size());
    for (size_t h = 0; h < (size_t) n_head; ++h) {
        const float * b = m.data() + h * dd * dd;
        float * o = out.data() + h * dd * dd;
        for (size_t i = 0; i < dd; ++i) {
            for (size_t j = 0; j < dd; ++j) {
                o[j * dd + i] = b[i * dd + j];
            }
        }
    }
    return out;
}

// the tensors of one side of a layer's transform (c: its calibration; nullptr: none), named
// pyadaq_<x><side>_l<il>. The values' M without an explicit inverse is stored by rows: their
// inverse, on every query head of every batch, then reads it as it is.
void make_part(ggml_context * ctx, pyadaq_kv_part & part, const layer_calib * c, int64_t d, int64_t n_head_kv,
               bool drop_mean, char side, uint32_t il, ggml_type matrix_type) {
    if (c == nullptr || (c->basis.empty() && !drop_mean)) {
        return;  // none, or an identity whose mean stays
    }
    part.on = true;
    part.d = d;
    auto add = [&](const char * what, bool matrix) {
        ggml_tensor * t = matrix ? ggml_new_tensor_3d(ctx, matrix_type, d, d, n_head_kv)
                                 : ggml_new_tensor_2d(ctx, GGML_TYPE_F32, d, n_head_kv);
        ggml_format_name(t, "pyadaq_%s%c_l%u", what, side, il);
        return t;
    };
    part.u = c->basis.empty() ? nullptr : add("u", true);
    part.mean = drop_mean ? add("m", false) : nullptr;
    part.s = c->scale.empty() ? nullptr : add("s", false);
    part.n = c->inverse.empty() ? nullptr : add("n", true);
    part.rows = side == 'v' && part.n == nullptr;
}

// uploads a matrix's floats into t, converted to t's type (f32 or f16)
void set_matrix(ggml_tensor * t, const std::vector<float> & m) {
    GGML_ASSERT((int64_t) m.size() == ggml_nelements(t));
    if (t->type == GGML_TYPE_F32) {
        ggml_backend_tensor_set(t, m.data(), 0, ggml_nbytes(t));
        return;
    }
    GGML_ASSERT(t->type == GGML_TYPE_F16);
    std::vector<ggml_fp16_t> h(m.size());
    ggml_fp32_to_fp16_row(m.data(), h.data(), (int64_t) m.size());
    ggml_backend_tensor_set(t, h.data(), 0, ggml_nbytes(t));
}

// uploads one side's values into its tensors (after the buffer is allocated)
void fill_part(const pyadaq_kv_part & part, const layer_calib * c) {
    if (!part.on) {
        return;
    }
    if (part.u != nullptr) {
        set_matrix(part.u, part.rows ? c->basis : transposed(c->basis, c->n_head, c->d));
    }
    if (part.mean != nullptr) {
        ggml_backend_tensor_set(part.mean, c->mean.data(), 0, ggml_nbytes(part.mean));
    }
    if (part.s != nullptr) {
        ggml_backend_tensor_set(part.s, c->scale.data(), 0, ggml_nbytes(part.s));
    }
    if (part.n != nullptr) {
        set_matrix(part.n, transposed(c->inverse, c->n_head, c->d));
    }
}

} // namespace pyadaq_tf

using namespace pyadaq_tf;

int32_t pyadaq_next_context_kv_transform(int32_t il, int32_t is_v, int32_t n_head, int32_t head_size,
                                         const float * basis, const float * scale, const float * mean,
                                         const float * inverse, char * err, size_t err_size) {
    if (il < 0 || (is_v != 0 && is_v != 1) || n_head <= 0 || head_size <= 0) {
        tf_set_err(err, err_size, "a K/V transform needs a layer >= 0, is_v 0 or 1, n_head > 0 and head_size > 0");
        return -1;
    }
    if (basis == nullptr && (mean == nullptr || scale != nullptr || inverse != nullptr)) {
        tf_set_err(err, err_size, "a K/V transform without a matrix (the identity) takes a mean and no scales or inverse");
        return -1;
    }
    layer_calib c;
    c.n_head = n_head;
    c.d = head_size;
    const size_t nb = (size_t) n_head * head_size * head_size;
    if (basis != nullptr) {
        c.basis.assign(basis, basis + nb);
    }
    if (mean != nullptr) {
        c.mean.assign(mean, mean + (size_t) n_head * head_size);
    }
    if (inverse != nullptr) {
        c.inverse.assign(inverse, inverse + nb);
    }
    if (scale != nullptr) {
        c.scale.assign(scale, scale + (size_t) n_head * head_size);
        for (float x : c.scale) {
            if (!(x > 0.0f) || !std::isfinite(x)) {
                tf_set_err(err, err_size, std::string("layer ") + std::to_string(il) + " " + (is_v ? "V" : "K") +
                                              ": every scale of a transform must be a finite number > 0");
                return -1;
            }
        }
    }
    for (const auto * vec : { &c.basis, &c.mean, &c.inverse }) {
        for (float x : *vec) {
            if (!std::isfinite(x)) {
                tf_set_err(err, err_size, std::string("layer ") + std::to_string(il) + " " + (is_v ? "V" : "K") +
                                           ": the transform holds a value that is not finite");
                return -1;
            }
        }
    }
    t_pending.part[is_v][il] = std::move(c);
    return 0;
}

bool pyadaq_kv_transform_pending() {
    return !t_pending.empty();
}

void pyadaq_kv_transform_clear_pending() {
    t_pending = calib_set();
}

void pyadaq_kv_transform_take() {
    t_calib.reset();
    t_made.clear();
    if (!t_pending.empty()) {
        t_calib = std::make_unique<calib_set>(std::move(t_pending));
    }
    t_pending = calib_set();
}

void pyadaq_kv_transform_release() {
    forget(t_made);  // a context that was not created: its transforms go
    t_made.clear();
    t_calib.reset();
}

void pyadaq_kv_transform_create(const llama_model & model, uint32_t il, ggml_tensor * k, ggml_tensor * v) {
    if (t_calib == nullptr) {
        return;
    }
    const auto kit = t_calib->part[0].find((int32_t) il);
    const auto vit = t_calib->part[1].find((int32_t) il);
    const layer_calib * ck = kit == t_calib->part[0].end() ? nullptr : &kit->second;
    const layer_calib * cv = vit == t_calib->part[1].end() ? nullptr : &vit->second;
    if (ck == nullptr && cv == nullptr) {
        return;
    }
    const auto & hp = model.hparams;
    const std::string where = "pyadaq: layer " + std::to_string(il) + ": ";
    if (hp.is_mla() || v == nullptr) {
        throw std::runtime_error(where + "calibrated K/V transforms do not support MLA attention");
    }
    if (k->buffer == nullptr || ggml_backend_buffer_get_size(k->buffer) == 0) {
        return;  // a cache without memory (no_alloc: size estimates only)
    }
    const int64_t n_head_kv = hp.n_head_kv(il);
    const int64_t dk = hp.n_embd_head_k(il);
    const int64_t dv = hp.n_embd_head_v(il);
    for (const auto & [c, d, name] : { std::tuple{ ck, dk, "K" }, std::tuple{ cv, dv, "V" } }) {
        if (c != nullptr && (c->n_head != n_head_kv || c->d != d)) {
            throw std::runtime_error(where + name + " transform for " + std::to_string(c->n_head) + " heads of size " +
                                     std::to_string(c->d) + ", the layer has " + std::to_string(n_head_kv) +
                                     " KV heads of size " + std::to_string(d));
        }
    }
    const int32_t offsets = pyadaq_model_kv_offsets(&model, (int32_t) il);
    const bool drop_k_mean = ck != nullptr && !ck->mean.empty() && (offsets & 1);
    const bool drop_v_mean = cv != nullptr && !cv->mean.empty() && (offsets & 2);

    auto tf = std::make_shared<pyadaq_kv_transform>();
    tf->n_head_kv = n_head_kv;
    tf->cache = k;
    ggml_init_params params = { /*.mem_size =*/ 9 * ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr,
                                /*.no_alloc =*/ true };
    tf->ctx.reset(ggml_init(params));
    ggml_context * c0 = tf->ctx.get();
    // The keys' matrices are f16 where the K cache is quantized and lives in host memory: half the
    // memory and half the bytes read per token, at an error (relative 2^-11 per entry; mul_mat
    // also rounds the queries and keys to f16 for the product) far below the quantization's
    // (docs/CALIBRATION.md: KL unchanged within its errors). f32 for f16/f32/bf16 caches, whose
    // calibrated logits match the uncalibrated ones to float rounding, and for a GPU's cache. The
    // values' matrices likewise where the V cache is quantized: their forward product in small
    // batches is then pyadaq's CPU op (forward), since ggml's f16 out_prod was 4-5 % slower.
    // PYADAQ_TF_F16=0 at a context's creation keeps its matrices f32 (to compare: tests, and
    // scripts/bench_against.py --other-env).
    const char * f16_env = getenv("PYADAQ_TF_F16");
    const bool half = (f16_env == nullptr || strcmp(f16_env, "0") != 0) &&
                      ggml_backend_buft_is_host(ggml_backend_buffer_get_type(k->buffer));
    const ggml_type k_matrix = half && ggml_is_quantized(k->type) ? GGML_TYPE_F16 : GGML_TYPE_F32;
    const ggml_type v_matrix = half && ggml_is_quantized(v->type) ? GGML_TYPE_F16 : GGML_TYPE_F32;
    make_part(c0, tf->k, ck, dk, n_head_kv, drop_k_mean, 'k', il, k_matrix);
    make_part(c0, tf->v, cv, dv, n_head_kv, drop_v_mean, 'v', il, v_matrix);
    if (tf->k.n != nullptr) {
        tf->q = ggml_new_tensor_3d(c0, k_matrix, dk, dk, n_head_kv);
        ggml_format_name(tf->q, "pyadaq_qk_l%u", il);
    }
    // Keys given as the identity in a layer whose key mean stays (soft-capped logits, sinks), with
    // no value part, leave nothing to apply: the layer still gets its (empty) transform, so that
    // every layer given counts as calibrated (pyadaq_kv_transform_layers), and no buffer.
    if (tf->k.on || tf->v.on) {
        tf->buf.reset(ggml_backend_alloc_ctx_tensors_from_buft(c0, ggml_backend_buffer_get_type(k->buffer)));
        if (!tf->buf) {
            throw std::runtime_error(where + "could not allocate the buffer of its K/V transform");
        }
        ggml_backend_buffer_set_usage(tf->buf.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        fill_part(tf->k, ck);
        fill_part(tf->v, cv);
        if (tf->q != nullptr) {
            // q . N^T: the first operand's row j is column j of N^T, row j of N, as N is stored
            set_matrix(tf->q, ck->inverse);
        }
    }
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        g_by_cache[k] = tf;
        g_live = (int64_t) g_by_cache.size();
    }
    t_made.push_back(std::move(tf));
}

void pyadaq_kv_transform_attach(const llama_context * ctx) {
    if (t_made.empty()) {
        return;
    }
    std::lock_guard<std::mutex> lock(g_mutex);
    auto & owned = g_by_ctx[ctx];
    owned.insert(owned.end(), t_made.begin(), t_made.end());
    t_made.clear();
}

void pyadaq_kv_transform_detach(const llama_context * ctx) {
    std::vector<std::shared_ptr<pyadaq_kv_transform>> owned;
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        auto it = g_by_ctx.find(ctx);
        if (it == g_by_ctx.end()) {
            return;
        }
        owned = std::move(it->second);
        g_by_ctx.erase(it);
    }
    forget(owned);
}

const pyadaq_kv_transform * pyadaq_kv_transform_of(ggml_context * ctx0, const llama_kv_cache_context * mctx,
                                                   int32_t il) {
    if (g_live.load() == 0 || mctx == nullptr) {
        return nullptr;
    }
    const ggml_tensor * view = mctx->get_k(ctx0, il);
    const ggml_tensor * cache = view->view_src != nullptr ? view->view_src : view;
    // the context owns its transforms for as long as it builds graphs
    return find(cache).get();
}

void pyadaq_attn_transform_in(ggml_context * ctx0, const pyadaq_kv_transform * tf, ggml_tensor ** q,
                              ggml_tensor ** k, ggml_tensor ** v) {
    if (tf == nullptr) {
        return;
    }
    if (tf->k.on) {
        if (tf->k.u != nullptr) {  // the identity leaves the queries as they are
            *q = forward(ctx0, *q, tf->q != nullptr ? tf->q : tf->k.u, nullptr, tf->k.s, true);
        }
        if (*k != nullptr) {
            *k = forward(ctx0, *k, tf->k.u, tf->k.mean, tf->k.s, false);
        }
    }
    if (tf->v.on && *v != nullptr) {
        *v = forward(ctx0, *v, tf->v.u, tf->v.mean, tf->v.s, false, tf->v.rows);
    }
}

ggml_tensor * pyadaq_attn_transform_out(ggml_context * ctx0, const pyadaq_kv_transform * tf, ggml_tensor * cur) {
    if (tf == nullptr || !tf->v.on) {
        return cur;
    }
    const int64_t d = tf->v.d;
    const int64_t n_tokens = ggml_nelements(cur) / cur->ne[0];
    const int64_t n_head = cur->ne[0] / d;
    GGML_ASSERT(cur->ne[0] == d * n_head && n_head % tf->n_head_kv == 0);
    ggml_tensor * x = ggml_is_contiguous(cur) ? cur : ggml_cont(ctx0, cur);
    ggml_tensor * y = inverse(ctx0, ggml_reshape_3d(ctx0, x, d, n_head, n_tokens), tf->v);
    if (tf->v.mean != nullptr) {
        // query head h = g * group + j belongs to KV head g
        y = ggml_reshape_4d(ctx0, y, d, n_head / tf->n_head_kv, tf->n_head_kv, n_tokens);
        y = ggml_add(ctx0, y, ggml_reshape_4d(ctx0, tf->v.mean, d, 1, tf->n_head_kv, 1));
    }
    return ggml_reshape_2d(ctx0, y, cur->ne[0], n_tokens);
}

ggml_tensor * pyadaq_kv_shift_begin(ggml_context * ctx, ggml_tensor * k, ggml_tensor * rot) {
    if (g_live.load() == 0) {
        return nullptr;
    }
    const auto tf = find(k);
    if (tf == nullptr || !tf->k.on) {
        return nullptr;
    }
    const int64_t d = tf->k.d;
    ggml_tensor * x = k->type == GGML_TYPE_F32 ? k : ggml_cast(ctx, k, GGML_TYPE_F32);
    x = ggml_reshape_3d(ctx, x, d, tf->n_head_kv, ggml_nelements(k) / (d * tf->n_head_kv));
    if (rot != nullptr) {
        x = llama_mul_mat_hadamard(ctx, x, rot);  // its own inverse
    }
    x = inverse(ctx, x, tf->k);
    if (tf->k.mean != nullptr) {
        x = ggml_add(ctx, x, ggml_reshape_3d(ctx, tf->k.mean, d, tf->n_head_kv, 1));
    }
    return x;
}

ggml_tensor * pyadaq_kv_shift_end(ggml_context * ctx, ggml_tensor * x, ggml_tensor * k, ggml_tensor * rot) {
    const auto tf = find(k);
    GGML_ASSERT(tf != nullptr && tf->k.on);
    ggml_tensor * y = forward(ctx, x, tf->k.u, tf->k.mean, tf->k.s, false, tf->k.rows);
    if (rot != nullptr) {
        y = llama_mul_mat_hadamard(ctx, y, rot);
    }
    return ggml_cpy(ctx, ggml_reshape_3d(ctx, y, k->ne[0], k->ne[1], k->ne[2]), k);
}

int32_t pyadaq_kv_transform_layers(const struct llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_by_ctx.find(ctx);
    return it == g_by_ctx.end() ? 0 : (int32_t) it->second.size();
}

int32_t pyadaq_model_kv_offsets(const struct llama_model * model, int32_t il) {
    if (model == nullptr || il < 0 || il >= (int32_t) model->hparams.n_layer()) {
        return -1;
    }
    // the identities that let the offsets out: no soft-capping of the logits (keys; Grok's
    // graph caps them by architecture, without the flag), no learned sinks (keys and values:
    // the weights of the cached tokens no longer sum to one)
    const bool capped = model->hparams.attn_soft_cap || model->arch == LLM_ARCH_GROK;
    const bool sinks = il < (int32_t) model->layers.size() && model->layers[il].attn_sinks != nullptr;
    return (!capped && !sinks ? 1 : 0) | (!sinks ? 2 : 0);
}

int64_t pyadaq_kv_transform_bytes(const struct llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_by_ctx.find(ctx);
    int64_t total = 0;
    if (it != g_by_ctx.end()) {
        for (const auto & tf : it->second) {
            total += tf->buf ? (int64_t) ggml_backend_buffer_get_size(tf->buf.get()) : 0;
        }
    }
    return total;
}
