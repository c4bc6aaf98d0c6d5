// The recent-token window in libllama (see pyadaq-kv-window.h): the exported entry point that
// gives the next context a window, and the hooks that llama_kv_cache, build_attn and llama_free
// call (native/patches/0017).

#include "llama.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "pyadaq-kv-window.h"
#include "pyadaq-quants.h"

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

// the most cells a window may keep
#define PYADAQ_KV_WINDOW_MAX 65536

extern "C" {

// The next context created on the calling thread keeps the rows of the last n_cells cells it writes
// in f16 beside its quantized K/V caches (0: no window). Returns 0, or -1 for n_cells < 0 or above
// PYADAQ_KV_WINDOW_MAX.
PYADAQ_API int32_t pyadaq_next_context_kv_window(int32_t n_cells);
// The window of a context (cells; 0: none) and the bytes of its buffers.
PYADAQ_API int32_t pyadaq_kv_window_cells(const struct llama_context * ctx);
PYADAQ_API int64_t pyadaq_kv_window_bytes(const struct llama_context * ctx);

}

namespace pyadaq_win {

// one cache's window: the tags of its slots, and the buffers of its layers' copies
struct cache_window {
    const void * cache = nullptr;
    int64_t W = 0;
    std::vector<int32_t> tags;  // the cell each slot holds, -1: none
    ggml_tensor * tag_t = nullptr;  // the tags where the kernels read them, I32 [W]
    std::vector<ggml_context_ptr> ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;

    void upload() const { ggml_backend_tensor_set(tag_t, tags.data(), 0, tags.size() * sizeof(int32_t)); }
};

struct layer_window {
    std::shared_ptr<cache_window> cw;
    ggml_tensor * k = nullptr;  // [n_embd_k_gqa, W + 1] f16 (nullptr: K is not quantized)
    ggml_tensor * v = nullptr;
};

thread_local int32_t w_pending = 0;
thread_local int32_t w_active = 0;
thread_local std::vector<std::shared_ptr<cache_window>> w_made;  // for the context being built

std::mutex w_mutex;
std::map<const ggml_tensor *, layer_window> w_by_layer;  // key: the layer's K cache tensor
std::map<const void *, std::shared_ptr<cache_window>> w_by_cache;
std::map<const llama_context *, std::vector<std::shared_ptr<cache_window>>> w_by_ctx;
std::atomic<int64_t> w_live{ 0 };  // w_by_layer.size(), readable without the lock

void w_forget(const std::vector<std::shared_ptr<cache_window>> & cws) {
    std::lock_guard<std::mutex> lock(w_mutex);
    for (const auto & cw : cws) {
        for (auto it = w_by_layer.begin(); it != w_by_layer.end();) {
            it = it->second.cw == cw ? w_by_layer.erase(it) : std::next(it);
        }
        auto it = w_by_cache.find(cw->cache);
        if (it != w_by_cache.end() && it->second == cw) {
            w_by_cache.erase(it);
        }
    }
    w_live = (int64_t) w_by_layer.size();
}

bool w_find(const ggml_tensor * cache, layer_window & out) {
    std::lock_guard<std::mutex> lock(w_mutex);
    auto it = w_by_layer.find(cache);
    if (it == w_by_layer.end()) {
        return false;
    }
    out = it->second;
    return true;
}

bool find_layer(ggml_context * ctx0, const llama_kv_cache_context * mctx, int32_t il, layer_window & out) {
    if (w_live.load() == 0 || mctx == nullptr) {
        return false;
    }
    const ggml_tensor * view = mctx->get_k(ctx0, il);
    return w_find(view->view_src != nullptr ? view->view_src : view, out);
}

// The slots of one ubatch's cells, shared by every layer of a cache: filled with the cells by
// llama's own k_idxs setter, then mapped to slots; the tags follow.
class window_input : public llm_graph_input_i {
  public:
    window_input(std::shared_ptr<cache_window> cw, std::function<const llama_kv_cache_context *()> mctx,
                 ggml_tensor * idx) :
        cw(std::move(cw)), mctx(std::move(mctx)), idx(idx) {}

    void set_input(const llama_ubatch * ubatch) override {
        mctx()->set_input_k_idxs(idx, ubatch);
        int64_t * cells = (int64_t *) idx->data;
        const int64_t n = idx->ne[0];
        const int64_t W = cw->W;
        last.assign((size_t) W, -1);
        for (int64_t i = 0; i < n; ++i) {
            last[(size_t) (cells[i] % W)] = i;
        }
        for (int64_t i = 0; i < n; ++i) {
            const int64_t slot = cells[i] % W;
            if (last[(size_t) slot] == i) {
                cw->tags[(size_t) slot] = (int32_t) cells[i];
                cells[i] = slot;
            } else {
                cells[i] = W;  // a later cell of this batch keeps the slot: the spare row
            }
        }
        cw->upload();
    }

    bool can_reuse(const llm_graph_params & params) override { return idx->ne[0] == params.ubatch.n_tokens; }

    std::shared_ptr<cache_window> cw;
    std::function<const llama_kv_cache_context *()> mctx;
    ggml_tensor * idx;

  private:
    std::vector<int64_t> last;
};

// this graph's slot input for a cache, made by its first layer
ggml_tensor * slot_input(ggml_context * ctx0, llm_graph_result * res, const std::shared_ptr<cache_window> & cw,
                         const std::function<const llama_kv_cache_context *()> & mctx, int64_t n_tokens) {
    for (const auto & inp : res->inputs) {
        auto * w = dynamic_cast<window_input *>(inp.get());
        if (w != nullptr && w->cw == cw) {
            return w->idx;
        }
    }
    ggml_tensor * idx = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, n_tokens);
    ggml_set_input(idx);
    res->add_input(std::make_unique<window_input>(cw, mctx, idx));
    return idx;
}

}  // namespace pyadaq_win

using namespace pyadaq_win;

int32_t pyadaq_next_context_kv_window(int32_t n_cells) {
    if (n_cells < 0 || n_cells > PYADAQ_KV_WINDOW_MAX) {
        return -1;
    }
    w_pending = n_cells;
    return 0;
}

int32_t pyadaq_kv_window_cells(const struct llama_context * ctx) {
    std::lock_guard<std::mutex> lock(w_mutex);
    auto it = w_by_ctx.find(ctx);
    return it == w_by_ctx.end() || it->second.empty() ? 0 : (int32_t) it->second.front()->W;
}

int64_t pyadaq_kv_window_bytes(const struct llama_context * ctx) {
    std::lock_guard<std::mutex> lock(w_mutex);
    auto it = w_by_ctx.find(ctx);
    int64_t total = 0;
    if (it != w_by_ctx.end()) {
        for (const auto & cw : it->second) {
            for (const auto & b : cw->bufs) {
                total += (int64_t) ggml_backend_buffer_get_size(b.get());
            }
        }
    }
    return total;
}

bool pyadaq_kv_window_pending() {
    return w_pending != 0;
}

void pyadaq_kv_window_clear_pending() {
    w_pending = 0;
}

void pyadaq_kv_window_take() {
    w_active = w_pending;
    w_pending = 0;
    w_made.clear();
}

void pyadaq_kv_window_release() {
    w_forget(w_made);  // a context that was not created: its windows go
    w_made.clear();
    w_active = 0;
}

void pyadaq_kv_window_create(const llama_model & model, const void * cache, uint32_t il, ggml_tensor * k,
                             ggml_tensor * v) {
    const int64_t W = w_active;
    if (W == 0 || k == nullptr || v == nullptr || llm_arch_is_hybrid(model.arch) || model.arch == LLM_ARCH_DFLASH) {
        return;
    }
    if (k->buffer == nullptr || ggml_backend_buffer_get_size(k->buffer) == 0) {
        return;  // a cache without memory (no_alloc: size estimates only)
    }
    const bool qk = ggml_is_quantized(k->type);
    const bool qv = ggml_is_quantized(v->type);
    if ((!qk && !qv) || k->ne[2] != 1 || v->ne[2] != 1) {
        return;  // nothing quantized, or several streams
    }
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(k->buffer);
    // this cache's window, made by an earlier layer of the context being built (not an entry of a
    // context freed at this address a moment ago on another thread, which its detach removes)
    std::shared_ptr<cache_window> cw;
    for (const auto & made : w_made) {
        if (made->cache == cache) {
            cw = made;
        }
    }
    if (cw == nullptr) {
        cw = std::make_shared<cache_window>();
        cw->cache = cache;
        cw->W = W;
        cw->tags.assign((size_t) W, -1);
        ggml_init_params params = { ggml_tensor_overhead(), nullptr, true };
        ggml_context_ptr ctx(ggml_init(params));
        cw->tag_t = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, W);
        ggml_set_name(cw->tag_t, "pyadaq_window_tags");
        ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft));
        if (!buf) {
            throw std::runtime_error("pyadaq: could not allocate the KV window's tags");
        }
        cw->ctxs.push_back(std::move(ctx));
        cw->bufs.push_back(std::move(buf));
        cw->upload();
        std::lock_guard<std::mutex> lock(w_mutex);
        w_by_cache[cache] = cw;
        w_made.push_back(cw);
    }
    layer_window lw;
    lw.cw = cw;
    ggml_init_params params = { 2 * ggml_tensor_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(params));
    if (qk) {
        lw.k = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F16, k->ne[0], W + 1);
        ggml_format_name(lw.k, "pyadaq_window_k_l%u", il);
    }
    if (qv) {
        lw.v = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F16, v->ne[0], W + 1);
        ggml_format_name(lw.v, "pyadaq_window_v_l%u", il);
    }
    ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft));
    if (!buf) {
        throw std::runtime_error("pyadaq: layer " + std::to_string(il) + ": could not allocate its KV window");
    }
    ggml_backend_buffer_clear(buf.get(), 0);
    std::lock_guard<std::mutex> lock(w_mutex);
    cw->ctxs.push_back(std::move(ctx));
    cw->bufs.push_back(std::move(buf));
    w_by_layer[k] = lw;
    w_live = (int64_t) w_by_layer.size();
}

void pyadaq_kv_window_attach(const llama_context * ctx) {
    if (w_made.empty()) {
        return;
    }
    std::lock_guard<std::mutex> lock(w_mutex);
    auto & owned = w_by_ctx[ctx];
    owned.insert(owned.end(), w_made.begin(), w_made.end());
    w_made.clear();
}

void pyadaq_kv_window_detach(const llama_context * ctx) {
    std::vector<std::shared_ptr<cache_window>> owned;
    {
        std::lock_guard<std::mutex> lock(w_mutex);
        auto it = w_by_ctx.find(ctx);
        if (it == w_by_ctx.end()) {
            return;
        }
        owned = std::move(it->second);
        w_by_ctx.erase(it);
    }
    w_forget(owned);
}

void pyadaq_kv_window_invalidate(const void * cache) {
    if (w_live.load() == 0) {
        return;
    }
    std::shared_ptr<cache_window> cw;
    {
        std::lock_guard<std::mutex> lock(w_mutex);
        auto it = w_by_cache.find(cache);
        if (it == w_by_cache.end()) {
            return;
        }
        cw = it->second;
    }
    std::fill(cw->tags.begin(), cw->tags.end(), -1);
    cw->upload();
}

void pyadaq_kv_window_write(ggml_context * ctx0, ggml_cgraph * gf, llm_graph_result * res,
                            const std::function<const llama_kv_cache_context *()> & mctx, int32_t il,
                            ggml_tensor * k_cur, ggml_tensor * v_cur) {
    layer_window lw;
    if (!find_layer(ctx0, mctx(), il, lw)) {
        return;
    }
    for (auto [hi, cur] : { std::pair{ lw.k, k_cur }, std::pair{ lw.v, v_cur } }) {
        if (hi == nullptr || cur == nullptr) {
            continue;
        }
        // [head size, heads, tokens], the heads of a token contiguous, as the cache writes assume
        const int64_t n_tokens = cur->ne[2];
        GGML_ASSERT(cur->ne[0] * cur->ne[1] == hi->ne[0]);
        ggml_tensor * rows = ggml_view_2d(ctx0, cur, hi->ne[0], n_tokens, cur->nb[2], 0);
        ggml_tensor * idx = slot_input(ctx0, res, lw.cw, mctx, n_tokens);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx0, hi, rows, idx));
    }
}

void pyadaq_kv_window_attend(ggml_context * ctx0, const llama_kv_cache_context * mctx, int32_t il, ggml_tensor * cur) {
    layer_window lw;
    if (!find_layer(ctx0, mctx, il, lw)) {
        return;
    }
    ggml_tensor * fa = cur;
    for (int i = 0; i < 4 && fa != nullptr && fa->op != GGML_OP_FLASH_ATTN_EXT; ++i) {
        fa = fa->src[0];
    }
    if (fa == nullptr || fa->op != GGML_OP_FLASH_ATTN_EXT) {
        return;  // attention without flash attention reads the quantized rows
    }
    fa->src[5] = lw.k;
    fa->src[6] = lw.v;
    fa->src[7] = lw.cw->tag_t;
}
