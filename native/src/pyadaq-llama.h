// pyadaq hooks called from upstream llama.cpp sources (native/patches/0005). Internal to
// libllama: the exported C entry points are declared in pyadaq-llama.cpp.
//
// Settings for the next context of a thread: pyadaq_next_context_layer_types() and
// pyadaq_next_context_attn_rot() fill a thread-local slot (per-layer K and V types, attention
// rotation). The next llama_init_from_model() call on that thread takes it (a
// pyadaq_layer_types_scope at the top of the function), checks it against the model and the
// context parameters (pyadaq_layer_types_check), and while the context is built the KV cache
// asks pyadaq_kv_layer_type() for the type of each layer's tensors and
// pyadaq_attn_rot_disable() whether to rotate. Outside such a call, or with an empty slot,
// every hook returns what upstream would use, so upstream behaviour is unchanged.
#pragma once

#include "ggml.h"
#include "llama.h"

#include <cstdint>
#include <vector>

struct llama_model;
struct llama_device;

// Takes this thread's pending settings for the lifetime of the object (one
// llama_init_from_model call); they are consumed whether the call succeeds or not.
struct pyadaq_layer_types_scope {
    explicit pyadaq_layer_types_scope(const llama_model * model);
    ~pyadaq_layer_types_scope();
    pyadaq_layer_types_scope(const pyadaq_layer_types_scope &) = delete;
    pyadaq_layer_types_scope & operator=(const pyadaq_layer_types_scope &) = delete;
};

// Whether the KV cache being built turns attention rotation of K (is_v = false) or V off: the
// active setting, or else upstream's reading of LLAMA_ATTN_ROT_DISABLE (env_disable).
bool pyadaq_attn_rot_disable(bool is_v, bool env_disable);

// Checks the active per-layer types against the model (layer count, head sizes) and the
// final context parameters: a quantized V
// layer needs flash attention (AUTO is switched to ENABLED, DISABLED is an error). Logs the
// reason and returns false when the context must not be created.
bool pyadaq_layer_types_check(const llama_model & model, llama_context_params & params);

// The type of layer il's K (is_v = false) or V (is_v = true) cache tensor.
ggml_type pyadaq_kv_layer_type(uint32_t il, bool is_v, ggml_type uniform);

// Whether the uniform type or any active per-layer K (V) type is quantized: the KV cache then
// stores K (V) with attention rotation (for every layer, so that all of them agree).
bool pyadaq_kv_any_quantized(bool is_v, ggml_type uniform);

// Called by llama_init_from_model on the new context: logs a warning naming each layer whose
// KV cache lives on a GPU that cannot run the ops the layer's K/V types need (ggml would run
// them on the CPU, silently). pyadaq's Python layer raises an error instead
// (pyadaq_kv_offload_check).
void pyadaq_kv_offload_warn(const llama_context * ctx);

// Called by llama.cpp's device selection at model load (llama_prepare_model_devices) with the
// devices it chose by default: drops the RPC devices of servers registered by
// pyadaq_next_model_rpc_servers() (pyadaq-rpc.cpp) that the model being loaded did not name.
void pyadaq_model_devices(std::vector<llama_device> & devices);
