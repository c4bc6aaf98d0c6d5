// llama-level code of pyadaq, compiled into libllama: exported C entry points (KV-cache
// bytes, per-layer KV-cache types, K/V activation capture) and the hooks that upstream's
// sources call (pyadaq-llama.h, native/patches/0005). No public struct layout changes.

#include "llama.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-memory.h"
#include "llama-model.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "pyadaq-kv-transform.h"
#include "pyadaq-kv-window.h"
#include "pyadaq-llama.h"
#include "pyadaq-quants.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

extern "C" {

// Bytes of the buffers that hold the context's KV cache (all layers, K and V, every
// device), as llama.cpp allocated them; -1 if the context has no memory module.
PYADAQ_API int64_t pyadaq_kv_cache_bytes(const struct llama_context * ctx);

// Settings for the next context created on the calling thread. Each call below fills one part
// of a thread-local slot; the next llama_init_from_model() call on the same thread takes the
// whole slot and empties it, whether it succeeds or not. Other threads, and contexts created
// later, never see it.
//
// Per-layer KV-cache types: types_k[il] and types_v[il] are ggml type ids for layers
// 0..n_layer-1, used instead of the context's type_k/type_v. With a model they are checked
// against it now (layer count, head sizes, MLA); without one (NULL: the model is not loaded
// yet) when the context is created, which then fails with the reason in llama.cpp's log.
// n_layer == 0 drops pending types. Returns 0, or -1 with a message in err (may be NULL) and
// nothing stored, for a wrong layer count, a type that is not a KV-cache type or whose block
// size does not divide the layer's head size, or different K and V types on an MLA model.
PYADAQ_API int32_t pyadaq_next_context_layer_types(const struct llama_model * model, int32_t n_layer,
                                                   const int32_t * types_k, const int32_t * types_v,
                                                   char * err, size_t err_size);
// Attention rotation of a quantized cache (llama.cpp's Hadamard rotation of K and V):
// 1 = upstream's choice (on where the head size allows), 0 = off, -1 = as the environment
// says (LLAMA_ATTN_ROT_DISABLE; the default).
PYADAQ_API void pyadaq_next_context_attn_rot(int32_t mode);
// The same for K and V separately (a calibrated context rotates its keys itself, and leaves
// its values to llama.cpp's rotation unless their types are transform-coded).
PYADAQ_API void pyadaq_next_context_attn_rot_kv(int32_t mode_k, int32_t mode_v);
// Empties the slot.
PYADAQ_API void pyadaq_next_context_clear(void);
// What the slot holds: bit 0 per-layer types, bit 1 an attention-rotation setting, bit 2 a
// calibrated K/V transform (pyadaq_next_context_kv_transform, pyadaq-kv-transform.cpp), bit 3 a
// KV window (pyadaq_next_context_kv_window, pyadaq-kv-window.cpp).
PYADAQ_API int32_t pyadaq_next_context_pending(void);

// The ggml types of the K and V cache tensors of each layer of the context's KV cache (the
// iSWA cache's two parts included): fills types_k/types_v[0..min(n_max, n_layer)) with a type
// id, or -1 for a layer without its own cache tensors; returns the model's layer count, or
// -1 when the context has no KV cache pyadaq can read.
PYADAQ_API int32_t pyadaq_kv_layer_types(const struct llama_context * ctx, int32_t n_max,
                                        int32_t * types_k, int32_t * types_v);

// K/V activation capture. An evaluation callback (llama_context_params.cb_eval, user data:
// the capture) that observes the tensors named "Kcur-<il>" and "Vcur-<il>" (the keys and
// values of layer il as the model computes them, before they enter the cache; the last such
// node of each layer in the graph: keys after RoPE and any key norm) and accumulates, per layer
// and KV head, the Gram matrix X^T X and the sum of the rows (one row per token, head_size wide)
// in double precision.
struct pyadaq_kv_capture;
PYADAQ_API struct pyadaq_kv_capture * pyadaq_kv_capture_new(const struct llama_model * model);
PYADAQ_API void pyadaq_kv_capture_free(struct pyadaq_kv_capture * cap);
PYADAQ_API bool pyadaq_kv_capture_eval_cb(struct ggml_tensor * t, bool ask, void * user_data);
// Adds what the last llama_decode() computed (call after each decode).
PYADAQ_API void pyadaq_kv_capture_flush(struct pyadaq_kv_capture * cap);
// Rows (tokens) accumulated for layer il's K (is_v = 0) or V (is_v = 1); -1 for a bad layer.
PYADAQ_API int64_t pyadaq_kv_capture_rows(const struct pyadaq_kv_capture * cap, int32_t is_v, int32_t il);
// Head size and KV head count of layer il's K or V; 0 for a bad layer.
PYADAQ_API int32_t pyadaq_kv_capture_head_size(const struct pyadaq_kv_capture * cap, int32_t is_v, int32_t il);
PYADAQ_API int32_t pyadaq_kv_capture_n_head(const struct pyadaq_kv_capture * cap, int32_t is_v, int32_t il);
// Copies the Gram matrix (head_size x head_size, row-major) of one head into out (n doubles);
// returns head_size, or -1 for a bad layer/head or a too small out.
PYADAQ_API int32_t pyadaq_kv_capture_gram(const struct pyadaq_kv_capture * cap, int32_t is_v, int32_t il,
                                         int32_t head, double * out, int64_t n);
// Copies the sum of the rows (head_size values) of one head into out (n doubles); returns
// head_size, or -1 for a bad layer/head or a too small out.
PYADAQ_API int32_t pyadaq_kv_capture_sum(const struct pyadaq_kv_capture * cap, int32_t is_v, int32_t il,
                                        int32_t head, double * out, int64_t n);
// Nodes whose layout the capture could not read (not F32/F16/BF16); 0 in a normal run.
PYADAQ_API int64_t pyadaq_kv_capture_skipped(const struct pyadaq_kv_capture * cap);

// Whether the KV cache of a context runs where it lives. For every layer whose K/V cache
// tensors are in a GPU device's memory, asks that device whether it runs, with that layer's
// types, the ops attention needs: writing K and V (SET_ROWS) and, with flash attention on,
// FLASH_ATTN_EXT, or without it the two matrix products (MUL_MAT). An op the device cannot
// run is scheduled on the CPU by ggml, silently, copying the layer's cache every token. On
// CUDA it also reports a K/V pair that has no compiled flash-attention vector kernel (ggml
// then converts K and V to f16 for each generated token). Returns the number of layers with
// a problem (0: everything runs on its device) and describes them in err; -1 when the
// context has no KV cache pyadaq can read.
PYADAQ_API int32_t pyadaq_kv_offload_check(const struct llama_context * ctx, char * err, size_t err_size);

// Cache type names for llama.cpp's tools (native/patches/0011: -ctk/-ctv of the common
// argument parser and of llama-bench). pyadaq_kv_cache_type_from_name() returns the type of one
// of pyadaq's cache types that runs without a calibration (kvq2, kvq3), or GGML_TYPE_COUNT; for a
// name of pyadaq's that the tools cannot use (the calibrated kvt types, the research variants) it
// also sets *why (when why is not null) to a sentence saying so. pyadaq_kv_cache_type_names():
// the usable names, comma-separated, for the tools' help texts.
PYADAQ_API enum ggml_type pyadaq_kv_cache_type_from_name(const char * name, const char ** why);
PYADAQ_API const char * pyadaq_kv_cache_type_names(void);

// A plan file (`pyadaq plan --out FILE`) for processes other than pyadaq's Python: llama.cpp's
// tools (`--kv-plan FILE` in the common argument parser, native/patches/0013) or any program,
// through the environment variable PYADAQ_KV_PLAN, read at the first context creation. Every
// context created afterwards without per-layer types of its own (pyadaq_next_context_layer_types)
// gets the plan's types, once they have been checked against its model as pyadaq's Python checks
// them (layer count, head sizes, KV head counts, the types' block sizes); a plan that does not fit
// makes llama_init_from_model() fail with the reason in the log, never abort.
// pyadaq_kv_plan_file() reads and checks the file now (0, or -1 with the reason in err); a null
// or empty path clears it. pyadaq_kv_plan_env(0) ignores PYADAQ_KV_PLAN (pyadaq's Python does
// this: it takes plans as kv_plan=).
PYADAQ_API int32_t pyadaq_kv_plan_file(const char * path, char * err, size_t err_size);
PYADAQ_API void pyadaq_kv_plan_env(int32_t use);

}

namespace {

// pyadaq's cache types that llama.cpp's tools accept (no calibration needed); of its other
// names, those with the "kvt" prefix are the calibrated types, the rest research variants
constexpr ggml_type tool_cache_types[] = { GGML_TYPE_KVQ2, GGML_TYPE_KVQ3 };

} // namespace

ggml_type pyadaq_kv_cache_type_from_name(const char * name, const char ** why) {
    if (why != nullptr) {
        *why = nullptr;
    }
    if (name == nullptr) {
        return GGML_TYPE_COUNT;
    }
    for (ggml_type t : tool_cache_types) {
        if (strcmp(ggml_type_name(t), name) == 0) {
            return t;
        }
    }
    for (int t = GGML_TYPE_KVQ2; t < GGML_TYPE_COUNT; ++t) {
        const char * tn = ggml_type_name((ggml_type) t);
        if (tn == nullptr || strcmp(tn, name) != 0 || why == nullptr) {
            continue;
        }
        *why = strncmp(name, "kvt", 3) == 0
            ? "is one of pyadaq's calibrated types: it needs a KV calibration (pyadaq calibrate), which "
              "llama.cpp's tools cannot load; use it through pyadaq (pyadaq eval/chat/serve --engine python, "
              "pyadaq.Llama(kv_calibration=...))"
            : "is a research variant of pyadaq's kvq types, not a cache type for use";
    }
    return GGML_TYPE_COUNT;
}

const char * pyadaq_kv_cache_type_names(void) {
    static const std::string names = [] {
        std::string s;
        for (ggml_type t : tool_cache_types) {
            s += std::string(s.empty() ? "" : ", ") + ggml_type_name(t);
        }
        return s;
    }();
    return names.c_str();
}

int64_t pyadaq_kv_cache_bytes(const struct llama_context * ctx) {
    if (ctx == nullptr) {
        return -1;
    }
    const llama_memory_i * mem = llama_get_memory(ctx);
    if (mem == nullptr) {
        return -1;
    }
    int64_t total = 0;
    for (const auto & [buft, size] : mem->memory_breakdown()) {
        (void) buft;
        total += (int64_t) size;
    }
    return total;
}

// --- settings for the next context of a thread: per-layer KV-cache types, attention rotation -

namespace {

struct layer_types {
    std::vector<ggml_type> k;
    std::vector<ggml_type> v;
};

struct context_settings {
    layer_types types;  // empty: the context's uniform types
    int32_t attn_rot[2] = { -1, -1 };  // K, V
    std::string error;  // a plan file that does not fit the model: the context is refused

    bool has_types() const { return !types.k.empty(); }
    bool empty() const { return !has_types() && attn_rot[0] < 0 && attn_rot[1] < 0 && error.empty(); }
};

// filled by pyadaq_next_context_*; taken by the next llama_init_from_model on this thread
thread_local context_settings t_next;
// the settings of the llama_init_from_model() call running on this thread
thread_local context_settings * t_active = nullptr;

void set_err(char * err, size_t err_size, const std::string & msg) {
    if (err != nullptr && err_size > 0) {
        snprintf(err, err_size, "%s", msg.c_str());
    }
}

// float types and block-quantized types (unused and removed type ids have no block size)
bool is_cache_type(int32_t t) {
    if (t < 0 || t >= GGML_TYPE_COUNT) {
        return false;
    }
    if (t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16) {
        return true;
    }
    const auto * traits = ggml_get_type_traits((ggml_type) t);
    return traits->is_quantized && traits->blck_size > 0 && traits->type_size > 0;
}

// Checks per-layer types against a model; "" when they fit.
std::string check_against_model(const layer_types & lt, const llama_model & model) {
    const auto & hp = model.hparams;
    if (lt.k.size() != hp.n_layer()) {
        return "per-layer cache types for " + std::to_string(lt.k.size()) + " layers, the model has " +
               std::to_string(hp.n_layer());
    }
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        for (int is_v = 0; is_v < 2; ++is_v) {
            const ggml_type t = is_v ? lt.v[il] : lt.k[il];
            const uint32_t head = is_v ? hp.n_embd_head_v(il) : hp.n_embd_head_k(il);
            const int64_t blck = ggml_blck_size(t);
            if (head % blck != 0) {
                return std::string("layer ") + std::to_string(il) + " " + (is_v ? "V" : "K") + ": type " +
                       ggml_type_name(t) + " has block size " + std::to_string(blck) +
                       ", which does not divide the head size " + std::to_string(head);
            }
        }
        if (hp.is_mla() && lt.k[il] != lt.v[il]) {
            return "this model (MLA attention) needs the same K and V cache type in every layer";
        }
    }
    return "";
}

} // namespace

int32_t pyadaq_next_context_layer_types(const struct llama_model * model, int32_t n_layer,
                                        const int32_t * types_k, const int32_t * types_v,
                                        char * err, size_t err_size) {
    if (n_layer == 0) {
        t_next.types = {};
        return 0;
    }
    if (n_layer < 0 || types_k == nullptr || types_v == nullptr) {
        set_err(err, err_size, "per-layer cache types need n_layer > 0 and one K and one V type per layer");
        return -1;
    }
    layer_types lt;
    for (int32_t il = 0; il < n_layer; ++il) {
        for (int is_v = 0; is_v < 2; ++is_v) {
            const int32_t t = is_v ? types_v[il] : types_k[il];
            if (!is_cache_type(t)) {
                set_err(err, err_size, std::string("layer ") + std::to_string(il) + " " + (is_v ? "V" : "K") + ": " +
                                       std::to_string(t) + " is not a ggml type a KV cache can hold");
                return -1;
            }
        }
        lt.k.push_back((ggml_type) types_k[il]);
        lt.v.push_back((ggml_type) types_v[il]);
    }
    if (model != nullptr) {
        const std::string why = check_against_model(lt, *model);
        if (!why.empty()) {
            set_err(err, err_size, why);
            return -1;
        }
    }
    t_next.types = std::move(lt);
    return 0;
}

// --- a plan file (llama.cpp's tools, PYADAQ_KV_PLAN) --------------------------------------

namespace {

constexpr int plan_version = 1;  // pyadaq/runtime/kvplan.py PLAN_VERSION

struct file_plan {
    std::string path;
    std::string model_name;
    layer_types types;
    std::vector<int64_t> head_k, head_v, n_head_kv;
};

std::mutex g_plan_mutex;
bool g_plan_env = true;         // read PYADAQ_KV_PLAN at the first context creation
bool g_plan_set = false;        // pyadaq_kv_plan_file() was called, or the variable was read
std::shared_ptr<const file_plan> g_plan;
std::string g_plan_error;       // the file could not be used (every context is refused)

// a cache type by name, for a plan: upstream's and pyadaq's uncalibrated ones
ggml_type plan_type(const std::string & name, std::string & err) {
    for (int t = 0; t < GGML_TYPE_KVQ2; ++t) {
        const char * tn = ggml_type_name((ggml_type) t);
        if (tn != nullptr && name == tn && is_cache_type(t)) {
            return (ggml_type) t;
        }
    }
    const char * why = nullptr;
    const ggml_type t = pyadaq_kv_cache_type_from_name(name.c_str(), &why);
    if (t == GGML_TYPE_COUNT) {
        err = "'" + name + "' " + (why != nullptr ? why : "is not a KV cache type");
    }
    return t;
}

bool read_plan(const std::string & path, file_plan & out, std::string & err) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        err = "plan file not found or not readable: " + path;
        return false;
    }
    std::stringstream ss;
    ss << f.rdbuf();
    nlohmann::json d;
    try {
        d = nlohmann::json::parse(ss.str());
    } catch (const std::exception & e) {
        err = path + " is not a plan file: it is not valid JSON (" + e.what() + "); make one with `pyadaq plan`";
        return false;
    }
    const std::string where = path + ": ";
    if (!d.is_object()) {
        err = where + "expected a JSON object with the plan's fields";
        return false;
    }
    if (d.contains("version") && d["version"] != plan_version) {
        err = where + "plan format version " + d["version"].dump() + " is not supported (this build reads version " +
              std::to_string(plan_version) + "); make the plan again with `pyadaq plan`";
        return false;
    }
    for (const char * key : { "types_k", "types_v", "n_layer", "head_sizes_k", "head_sizes_v", "n_head_kv" }) {
        if (!d.contains(key)) {
            err = where + "missing key " + key;
            return false;
        }
    }
    if (!d["n_layer"].is_number_integer() || d["n_layer"].get<int64_t>() < 1) {
        err = where + "'n_layer' must be an integer >= 1";
        return false;
    }
    const size_t n_layer = d["n_layer"].get<size_t>();
    for (const char * key : { "types_k", "types_v", "head_sizes_k", "head_sizes_v", "n_head_kv" }) {
        if (!d[key].is_array() || d[key].size() != n_layer) {
            err = where + "'" + key + "' must be a list with one entry per layer (n_layer = " + std::to_string(n_layer) + ")";
            return false;
        }
    }
    for (size_t il = 0; il < n_layer; ++il) {
        for (int is_v = 0; is_v < 2; ++is_v) {
            const auto & name = d[is_v ? "types_v" : "types_k"][il];
            if (!name.is_string()) {
                err = where + "'" + (is_v ? "types_v" : "types_k") + "'[" + std::to_string(il) + "] must be a cache type name";
                return false;
            }
            std::string why;
            const ggml_type t = plan_type(name.get<std::string>(), why);
            if (t == GGML_TYPE_COUNT) {
                err = where + "layer " + std::to_string(il) + " of '" + (is_v ? "types_v" : "types_k") + "': " + why;
                return false;
            }
            (is_v ? out.types.v : out.types.k).push_back(t);
        }
        const std::pair<const char *, std::vector<int64_t> *> shapes[] = {
            { "head_sizes_k", &out.head_k }, { "head_sizes_v", &out.head_v }, { "n_head_kv", &out.n_head_kv } };
        for (const auto & [key, dst] : shapes) {
            const auto & x = d[key][il];
            if (!x.is_number_integer() || x.get<int64_t>() < 0) {
                err = where + "'" + key + "' must hold integers >= 0";
                return false;
            }
            dst->push_back(x.get<int64_t>());
        }
    }
    out.path = path;
    if (d.contains("model_name") && d["model_name"].is_string()) {
        out.model_name = d["model_name"].get<std::string>();
    }
    return true;
}

// the same checks as pyadaq/runtime/kvplan.py check_plan(), "" when the plan fits
std::string plan_mismatch(const file_plan & p, const llama_model & model) {
    const auto & hp = model.hparams;
    const std::string made_for = p.model_name.empty() ? "another model" : p.model_name;
    if (p.types.k.size() != hp.n_layer()) {
        return p.path + " was made for a model with " + std::to_string(p.types.k.size()) + " layers (" + made_for +
               "), this model has " + std::to_string(hp.n_layer()) + " layers: make a plan for this model with `pyadaq plan`";
    }
    std::vector<std::string> diffs;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        const int64_t ours[3] = { hp.n_embd_head_k(il), hp.n_embd_head_v(il), hp.n_head_kv(il) };
        const int64_t theirs[3] = { p.head_k[il], p.head_v[il], p.n_head_kv[il] };
        const char * what[3] = { "K head size", "V head size", "KV head count" };
        for (int i = 0; i < 3; ++i) {
            if (ours[i] != theirs[i]) {
                diffs.push_back("layer " + std::to_string(il) + " " + what[i] + " " + std::to_string(theirs[i]) +
                                " in the plan, " + std::to_string(ours[i]) + " in this model");
            }
        }
    }
    if (!diffs.empty()) {
        std::string msg = p.path + " was made for a model with other layer shapes (" + made_for + ") than this model: ";
        for (size_t i = 0; i < diffs.size() && i < 3; ++i) {
            msg += (i ? "; " : "") + diffs[i];
        }
        if (diffs.size() > 3) {
            msg += " (and " + std::to_string(diffs.size() - 3) + " more differences)";
        }
        return msg + "; make a plan for this model with `pyadaq plan`";
    }
    const std::string why = check_against_model(p.types, model);
    return why.empty() ? "" : p.path + ": " + why;
}

// the plan for a context being made (nothing when there is none)
void plan_for_context(const llama_model & model, context_settings & s) {
    std::shared_ptr<const file_plan> plan;
    std::string error;
    {
        std::lock_guard<std::mutex> lock(g_plan_mutex);
        if (!g_plan_set && g_plan_env) {
            g_plan_set = true;
            const char * env = getenv("PYADAQ_KV_PLAN");
            if (env != nullptr && env[0] != '\0') {
                auto p = std::make_shared<file_plan>();
                if (read_plan(env, *p, g_plan_error)) {
                    g_plan = p;
                } else {
                    g_plan_error = "PYADAQ_KV_PLAN: " + g_plan_error;
                }
            }
        }
        plan = g_plan;
        error = g_plan_error;
    }
    if (!error.empty()) {
        s.error = error;
        return;
    }
    if (plan == nullptr) {
        return;
    }
    s.error = plan_mismatch(*plan, model);
    if (s.error.empty()) {
        s.types = plan->types;
        LLAMA_LOG_INFO("%s: per-layer K/V cache types from %s\n", __func__, plan->path.c_str());
    }
}

} // namespace

int32_t pyadaq_kv_plan_file(const char * path, char * err, size_t err_size) {
    std::lock_guard<std::mutex> lock(g_plan_mutex);
    g_plan_set = true;
    g_plan = nullptr;
    g_plan_error.clear();
    if (path == nullptr || path[0] == '\0') {
        return 0;
    }
    auto p = std::make_shared<file_plan>();
    std::string why;
    if (!read_plan(path, *p, why)) {
        set_err(err, err_size, why);
        return -1;
    }
    g_plan = p;
    return 0;
}

void pyadaq_kv_plan_env(int32_t use) {
    std::lock_guard<std::mutex> lock(g_plan_mutex);
    g_plan_env = use != 0;
}

void pyadaq_next_context_attn_rot(int32_t mode) {
    pyadaq_next_context_attn_rot_kv(mode, mode);
}

void pyadaq_next_context_attn_rot_kv(int32_t mode_k, int32_t mode_v) {
    t_next.attn_rot[0] = mode_k < 0 ? -1 : (mode_k ? 1 : 0);
    t_next.attn_rot[1] = mode_v < 0 ? -1 : (mode_v ? 1 : 0);
}

void pyadaq_next_context_clear(void) {
    t_next = context_settings();
    pyadaq_kv_transform_clear_pending();
    pyadaq_kv_window_clear_pending();
}

int32_t pyadaq_next_context_pending(void) {
    return (t_next.has_types() ? 1 : 0) | (t_next.attn_rot[0] >= 0 || t_next.attn_rot[1] >= 0 ? 2 : 0) | (pyadaq_kv_transform_pending() ? 4 : 0) |
           (pyadaq_kv_window_pending() ? 8 : 0);
}

pyadaq_layer_types_scope::pyadaq_layer_types_scope(const llama_model * model) {
    if (!t_next.has_types() && model != nullptr) {
        plan_for_context(*model, t_next);
    }
    if (!t_next.empty()) {
        t_active = new context_settings(std::move(t_next));
    }
    t_next = context_settings();
    pyadaq_kv_transform_take();
    pyadaq_kv_window_take();
}

pyadaq_layer_types_scope::~pyadaq_layer_types_scope() {
    delete t_active;
    t_active = nullptr;
    pyadaq_kv_transform_release();
    pyadaq_kv_window_release();
}

bool pyadaq_attn_rot_disable(bool is_v, bool env_disable) {
    if (t_active == nullptr || t_active->attn_rot[is_v] < 0) {
        return env_disable;
    }
    return t_active->attn_rot[is_v] == 0;
}

bool pyadaq_layer_types_check(const llama_model & model, llama_context_params & params) {
    if (t_active != nullptr && !t_active->error.empty()) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, t_active->error.c_str());
        return false;
    }
    if (t_active == nullptr || !t_active->has_types()) {
        return true;
    }
    const std::string why = check_against_model(t_active->types, model);
    if (!why.empty()) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, why.c_str());
        return false;
    }
    const bool any_v_quantized = pyadaq_kv_any_quantized(true, params.type_v);
    if (any_v_quantized && params.flash_attn_type != LLAMA_FLASH_ATTN_TYPE_ENABLED) {
        if (params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
            LLAMA_LOG_ERROR("%s: the per-layer V cache types include a quantized type, which requires flash_attn\n",
                            __func__);
            return false;
        }
        LLAMA_LOG_INFO("%s: enabling flash_attn since the per-layer V cache types include a quantized type\n",
                       __func__);
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    }
    std::string desc;
    for (size_t il = 0; il < t_active->types.k.size(); ++il) {
        desc += std::string(il ? " " : "") + ggml_type_name(t_active->types.k[il]) + "/" +
                ggml_type_name(t_active->types.v[il]);
    }
    LLAMA_LOG_INFO("%s: %s: per-layer K/V cache types: %s\n", __func__, model.name.c_str(), desc.c_str());
    return true;
}

ggml_type pyadaq_kv_layer_type(uint32_t il, bool is_v, ggml_type uniform) {
    if (t_active == nullptr || !t_active->has_types()) {
        return uniform;
    }
    const auto & types = is_v ? t_active->types.v : t_active->types.k;
    return il < types.size() ? types[il] : uniform;  // layers past the list (MTP): uniform
}

bool pyadaq_kv_any_quantized(bool is_v, ggml_type uniform) {
    if (ggml_is_quantized(uniform)) {
        return true;
    }
    if (t_active == nullptr || !t_active->has_types()) {
        return false;
    }
    const auto & types = is_v ? t_active->types.v : t_active->types.k;
    return std::any_of(types.begin(), types.end(), [](ggml_type t) { return ggml_is_quantized(t); });
}

// The KV caches of a context: one, or the two parts of an iSWA cache; none for other memory.
static std::vector<const llama_kv_cache *> kv_caches(const llama_context * ctx) {
    llama_memory_i * mem = llama_get_memory(ctx);
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return { iswa->get_base(), iswa->get_swa() };
    }
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return { kv };
    }
    return {};
}

// A context for views of cache tensors (no data), and the slot of stream 0 to take them with.
static ggml_context_ptr view_context(size_t n_tensors) {
    ggml_init_params params = { /*.mem_size =*/ n_tensors * ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr,
                                /*.no_alloc =*/ true };
    return ggml_context_ptr(ggml_init(params));
}

static llama_kv_cache::slot_info stream0() {
    llama_kv_cache::slot_info sinfo;
    sinfo.s0 = 0;
    sinfo.s1 = 0;
    return sinfo;
}

static void read_kv_types(const llama_kv_cache * kv, bool has_v, int32_t n_max, int32_t * types_k, int32_t * types_v) {
    ggml_context_ptr ctx = view_context(4);
    for (uint32_t il : kv->get_layer_ids()) {
        if ((int32_t) il >= n_max) {
            continue;
        }
        types_k[il] = (int32_t) kv->get_k_storage((int32_t) il)->type;
        ggml_tensor * v = has_v ? kv->get_v(ctx.get(), (int32_t) il, 1, stream0()) : nullptr; // MLA: V is a view of K
        types_v[il] = v != nullptr ? (int32_t) v->type : -1;
        ggml_reset(ctx.get());
    }
}

int32_t pyadaq_kv_layer_types(const struct llama_context * ctx, int32_t n_max, int32_t * types_k,
                              int32_t * types_v) {
    if (ctx == nullptr || (n_max > 0 && (types_k == nullptr || types_v == nullptr))) {
        return -1;
    }
    for (int32_t il = 0; il < n_max; ++il) {
        types_k[il] = -1;
        types_v[il] = -1;
    }
    const auto caches = kv_caches(ctx);
    if (caches.empty()) {
        return -1;
    }
    const llama_model * model = llama_get_model(ctx);
    for (const llama_kv_cache * kv : caches) {
        read_kv_types(kv, !model->hparams.is_mla(), n_max, types_k, types_v);
    }
    return (int32_t) llama_model_n_layer(model);
}

// --- does each layer's cache run where it lives? --------------------------------------------

// The K/V pairs with a compiled CUDA flash-attention vector kernel ("k-v,k-v,..."), from
// native/cmake/pyadaq_cuda.cmake; empty in a build without CUDA.
#ifndef PYADAQ_CUDA_FA_PAIRS
#    define PYADAQ_CUDA_FA_PAIRS ""
#endif

static bool cuda_fa_pair_compiled(ggml_type k, ggml_type v) {
    const std::string pairs = std::string(",") + PYADAQ_CUDA_FA_PAIRS + ",";
    const std::string pair = std::string(",") + ggml_type_name(k) + "-" + ggml_type_name(v) + ",";
    return pairs.find(pair) != std::string::npos;
}

static ggml_backend_dev_t tensor_device(const ggml_tensor * t) {
    const ggml_tensor * s = t->view_src != nullptr ? t->view_src : t;
    if (s->buffer == nullptr) {
        return nullptr;
    }
    return ggml_backend_buft_get_device(ggml_backend_buffer_get_type(s->buffer));
}

static void check_kv_offload(const llama_kv_cache * kv, const llama_model & model, bool flash_attn,
                             std::map<uint32_t, std::string> & problems) {
    // PYADAQ_OFFLOAD_CHECK_CPU (tests): "1" checks a CPU-resident cache against the CPU device
    // too, which builds every op of the check on machines without a GPU; "list" also reports
    // each checked layer, with what was asked, as if it were a problem
    const char * env = getenv("PYADAQ_OFFLOAD_CHECK_CPU");
    const bool list_all = env != nullptr && strcmp(env, "list") == 0;
    const bool check_cpu = env != nullptr && (strcmp(env, "1") == 0 || list_all);
    const uint32_t n_kv = 256; // a multiple of every backend's padding
    ggml_context_ptr ctx_ptr = view_context(32);
    ggml_context * ctx = ctx_ptr.get();
    const llama_kv_cache::slot_info sinfo = stream0();
    for (uint32_t il : kv->get_layer_ids()) {
        ggml_reset(ctx);
        ggml_tensor * k_store = kv->get_k_storage((int32_t) il);
        if (k_store == nullptr) {
            continue;
        }
        ggml_tensor * k = kv->get_k(ctx, (int32_t) il, n_kv, sinfo);
        ggml_tensor * v = nullptr;
        if (!model.hparams.is_mla()) {
            v = kv->get_v(ctx, (int32_t) il, n_kv, sinfo);
        } else { // MLA: V is the first n_embd_head_v values of each K row, as in llama's graph
            v = ggml_view_4d(ctx, k, model.hparams.n_embd_head_v(il), k->ne[1], k->ne[2], k->ne[3],
                             k->nb[1], k->nb[2], k->nb[3], 0);
        }
        ggml_backend_dev_t dev = tensor_device(k_store);
        if (dev == nullptr && check_cpu) {
            dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU); // host buffers name no device
        }
        if (dev == nullptr || (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU && !check_cpu)) {
            continue;
        }
        const char * dev_name = ggml_backend_dev_name(dev);
        std::vector<std::string> why;
        std::vector<std::string> asked;

        // writing the new tokens' K and V
        for (ggml_tensor * store : { k_store, v != nullptr && v->view_src != k_store ? v->view_src : nullptr }) {
            if (store == nullptr) {
                continue;
            }
            ggml_tensor * rows = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, store->ne[0], 1, store->ne[2]);
            ggml_tensor * idx = ggml_new_tensor_2d(ctx, GGML_TYPE_I64, 1, 1);
            ggml_tensor * op = ggml_set_rows(ctx, store, rows, idx);
            asked.push_back(std::string("set_rows ") + ggml_type_name(store->type));
            if (!ggml_backend_dev_supports_op(dev, op)) {
                why.push_back(std::string("writing ") + ggml_type_name(store->type) + " rows");
            }
        }

        // attention for one token, the way llama's graph asks for it
        const int64_t n_head = model.hparams.n_head(il);
        const int64_t head_k = k->ne[0];
        ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, head_k, n_head, 1, k->ne[3]);
        q = ggml_permute(ctx, q, 0, 2, 1, 3);
        ggml_tensor * kp = ggml_permute(ctx, k, 0, 2, 1, 3);
        if (flash_attn && v != nullptr) {
            ggml_tensor * vp = ggml_permute(ctx, v, 0, 2, 1, 3);
            ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, 1, 1, k->ne[3]);
            ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, kp, vp, mask, 1.0f, 0.0f, 0.0f);
            ggml_prec_set_acc(fa, GGML_PREC_F32);
            asked.push_back(std::string("flash_attn ") + ggml_type_name(k->type) + "/" + ggml_type_name(v->type));
            if (!ggml_backend_dev_supports_op(dev, fa)) {
                why.push_back(std::string("flash attention with K ") + ggml_type_name(k->type) + " / V " +
                              ggml_type_name(v->type) + " (head size " + std::to_string(head_k) + ")");
            } else if (std::string(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev))) == "CUDA" &&
                       (head_k == 64 || head_k == 128 || head_k == 256) && v->ne[0] == head_k &&
                       !cuda_fa_pair_compiled(k->type, v->type)) {
                why.push_back(std::string("no compiled flash-attention vector kernel for K ") + ggml_type_name(k->type) +
                              " / V " + ggml_type_name(v->type) + ": K and V are converted to f16 for every token");
            }
        } else {
            ggml_tensor * kq = ggml_mul_mat(ctx, kp, q);
            asked.push_back(std::string("mul_mat ") + ggml_type_name(k->type));
            if (!ggml_backend_dev_supports_op(dev, kq)) {
                why.push_back(std::string("the K.Q product with K ") + ggml_type_name(k->type) +
                              " without flash attention (turn flash attention on)");
            }
        }
        if (list_all) {
            std::string a;
            for (const auto & x : asked) {
                a += (a.empty() ? "" : ", ") + x;
            }
            why.push_back("checked " + a);
        }
        if (!why.empty()) {
            std::string msg = std::string("layer ") + std::to_string(il) + " (" + dev_name + "): ";
            for (size_t i = 0; i < why.size(); ++i) {
                msg += (i ? "; " : "") + why[i];
            }
            problems[il] = msg;
        }
    }
}

int32_t pyadaq_kv_offload_check(const struct llama_context * ctx, char * err, size_t err_size) {
    if (ctx == nullptr) {
        return -1;
    }
    const auto caches = kv_caches(ctx);
    if (caches.empty()) {
        set_err(err, err_size, "the context has no KV cache pyadaq can read");
        return -1;
    }
    std::map<uint32_t, std::string> problems;
    for (const llama_kv_cache * kv : caches) {
        check_kv_offload(kv, *llama_get_model(ctx), ctx->get_cparams().flash_attn, problems);
    }
    std::string msg;
    for (const auto & p : problems) {
        msg += (msg.empty() ? "" : "\n") + p.second;
    }
    set_err(err, err_size, msg);
    return (int32_t) problems.size();
}

void pyadaq_kv_offload_warn(const llama_context * ctx) {
    char buf[2048];
    const int32_t n = pyadaq_kv_offload_check(ctx, buf, sizeof(buf));
    if (n > 0) {
        LLAMA_LOG_WARN("%s: %d layer(s) of the KV cache need ops their device cannot run; ggml will run them "
                       "on the CPU, copying the cache every token:\n%s\n", __func__, n, buf);
    }
}

// --- K/V activation capture -----------------------------------------------------------------

struct pyadaq_kv_capture {
    struct part {
        int32_t head_size = 0;
        int32_t n_head = 0;
        int64_t rows = 0;
        std::vector<double> gram;      // n_head * head_size * head_size (upper triangle filled)
        std::vector<double> sum;       // n_head * head_size
        std::vector<float> staged;     // the last node of this layer in the current graph (ubatch)
        int64_t staged_rows = 0;
    };
    std::vector<part> parts[2];        // [is_v][il]
    std::vector<uint8_t> scratch;
    int64_t skipped = 0;
    int max_staged_layer = -1;         // highest layer with staged rows in the current graph
};

pyadaq_kv_capture * pyadaq_kv_capture_new(const llama_model * model) {
    if (model == nullptr) {
        return nullptr;
    }
    const auto & hp = model->hparams;
    auto * cap = new pyadaq_kv_capture();
    for (int is_v = 0; is_v < 2; ++is_v) {
        cap->parts[is_v].resize(hp.n_layer());
        for (uint32_t il = 0; il < hp.n_layer(); ++il) {
            auto & p = cap->parts[is_v][il];
            p.head_size = (int32_t) (is_v ? hp.n_embd_head_v(il) : hp.n_embd_head_k(il));
            p.n_head = (int32_t) hp.n_head_kv(il);
            p.gram.assign((size_t) p.n_head * p.head_size * p.head_size, 0.0);
            p.sum.assign((size_t) p.n_head * p.head_size, 0.0);
        }
    }
    return cap;
}

void pyadaq_kv_capture_free(pyadaq_kv_capture * cap) {
    delete cap;
}

static bool parse_name(const char * name, int & is_v, int & il) {
    if (strncmp(name, "Kcur-", 5) == 0) {
        is_v = 0;
    } else if (strncmp(name, "Vcur-", 5) == 0) {
        is_v = 1;
    } else {
        return false;
    }
    char * end = nullptr;
    const long v = strtol(name + 5, &end, 10);
    if (end == name + 5 || *end != '\0' || v < 0) {
        return false;
    }
    il = (int) v;
    return true;
}

// Adds the staged rows of every layer to its Gram matrices (the end of one graph's K/V).
static void capture_commit(pyadaq_kv_capture * cap) {
    for (auto & parts : cap->parts) {
        for (auto & p : parts) {
            const int64_t d = p.head_size;
            for (int64_t r = 0; r < p.staged_rows; ++r) {
                for (int64_t h = 0; h < p.n_head; ++h) {
                    const float * x = p.staged.data() + (r * p.n_head + h) * d;
                    double * g = p.gram.data() + h * d * d;
                    double * sm = p.sum.data() + h * d;
                    for (int64_t a = 0; a < d; ++a) {
                        const double xa = x[a];
                        sm[a] += xa;
                        double * ga = g + a * d;
                        for (int64_t b = a; b < d; ++b) {
                            ga[b] += xa * (double) x[b];
                        }
                    }
                }
            }
            p.rows += p.staged_rows;
            p.staged_rows = 0;
        }
    }
    cap->max_staged_layer = -1;
}

// One llama_decode runs one graph per ubatch, and a layer's K (V) is named "Kcur-<il>" at
// several steps of one graph (the last one is what enters the cache), so staged rows are
// replaced within a graph and committed when the next graph starts: at a "result..." node
// (the model's output, computed after every layer), or when a node of a layer below the highest
// one staged arrives (a graph without such an output); pyadaq_kv_capture_flush commits the
// last graph.
bool pyadaq_kv_capture_eval_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * cap = static_cast<pyadaq_kv_capture *>(user_data);
    if (cap == nullptr) {
        return ask ? false : true;
    }
    int is_v = 0;
    int il = 0;
    if (!parse_name(t->name, is_v, il) || il >= (int) cap->parts[is_v].size()) {
        if (ask && strncmp(t->name, "result", 6) == 0) {
            capture_commit(cap);
        }
        return ask ? false : true;
    }
    if (ask) {
        return true;
    }
    if (il < cap->max_staged_layer) {
        capture_commit(cap); // a new graph (ubatch) has started
    }
    auto & p = cap->parts[is_v][il];
    const int64_t width = (int64_t) p.head_size * p.n_head;
    const int64_t n = ggml_nelements(t);
    if (width == 0 || n % width != 0 ||
        (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16)) {
        cap->skipped++;
        return true;
    }
    // bring the bytes the tensor spans to the host (views of device buffers included)
    const size_t nbytes = ggml_nbytes(t);
    const uint8_t * base;
    if (t->buffer != nullptr && !ggml_backend_buffer_is_host(t->buffer)) {
        cap->scratch.resize(nbytes);
        ggml_backend_tensor_get(t, cap->scratch.data(), 0, nbytes);
        base = cap->scratch.data();
    } else {
        base = (const uint8_t *) t->data;
    }
    p.staged.resize((size_t) n);
    size_t j = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; ++i3) {
        for (int64_t i2 = 0; i2 < t->ne[2]; ++i2) {
            for (int64_t i1 = 0; i1 < t->ne[1]; ++i1) {
                const uint8_t * row = base + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
                for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) {
                    const uint8_t * e = row + i0 * t->nb[0];
                    float x;
                    if (t->type == GGML_TYPE_F32) {
                        memcpy(&x, e, sizeof(x));
                    } else if (t->type == GGML_TYPE_F16) {
                        ggml_fp16_t h;
                        memcpy(&h, e, sizeof(h));
                        x = ggml_fp16_to_fp32(h);
                    } else {
                        ggml_bf16_t h;
                        memcpy(&h, e, sizeof(h));
                        x = ggml_bf16_to_fp32(h);
                    }
                    p.staged[j++] = x;
                }
            }
        }
    }
    p.staged_rows = n / width;
    cap->max_staged_layer = std::max(cap->max_staged_layer, il);
    return true;
}

void pyadaq_kv_capture_flush(pyadaq_kv_capture * cap) {
    if (cap != nullptr) {
        capture_commit(cap);
    }
}

static const pyadaq_kv_capture::part * capture_part(const pyadaq_kv_capture * cap, int32_t is_v, int32_t il) {
    if (cap == nullptr || (is_v != 0 && is_v != 1) || il < 0 || il >= (int32_t) cap->parts[is_v].size()) {
        return nullptr;
    }
    return &cap->parts[is_v][il];
}

int64_t pyadaq_kv_capture_rows(const pyadaq_kv_capture * cap, int32_t is_v, int32_t il) {
    const auto * p = capture_part(cap, is_v, il);
    return p ? p->rows : -1;
}

int32_t pyadaq_kv_capture_head_size(const pyadaq_kv_capture * cap, int32_t is_v, int32_t il) {
    const auto * p = capture_part(cap, is_v, il);
    return p ? p->head_size : 0;
}

int32_t pyadaq_kv_capture_n_head(const pyadaq_kv_capture * cap, int32_t is_v, int32_t il) {
    const auto * p = capture_part(cap, is_v, il);
    return p ? p->n_head : 0;
}

int32_t pyadaq_kv_capture_gram(const pyadaq_kv_capture * cap, int32_t is_v, int32_t il, int32_t head,
                               double * out, int64_t n) {
    const auto * p = capture_part(cap, is_v, il);
    if (p == nullptr || head < 0 || head >= p->n_head || out == nullptr) {
        return -1;
    }
    const int64_t d = p->head_size;
    if (n < d * d) {
        return -1;
    }
    const double * g = p->gram.data() + head * d * d;
    for (int64_t a = 0; a < d; ++a) {
        for (int64_t b = 0; b < d; ++b) {
            out[a * d + b] = a <= b ? g[a * d + b] : g[b * d + a];
        }
    }
    return (int32_t) d;
}

int32_t pyadaq_kv_capture_sum(const pyadaq_kv_capture * cap, int32_t is_v, int32_t il, int32_t head,
                              double * out, int64_t n) {
    const auto * p = capture_part(cap, is_v, il);
    if (p == nullptr || head < 0 || head >= p->n_head || out == nullptr || n < p->head_size) {
        return -1;
    }
    memcpy(out, p->sum.data() + (size_t) head * p->head_size, (size_t) p->head_size * sizeof(double));
    return p->head_size;
}

int64_t pyadaq_kv_capture_skipped(const pyadaq_kv_capture * cap) {
    return cap ? cap->skipped : -1;
}
