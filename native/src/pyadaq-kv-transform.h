// Calibrated K/V transforms: the hooks upstream's sources call (native/patches/0010), internal
// to libllama. The exported C entry points are declared in pyadaq-kv-transform.cpp.
//
// A context created with a calibration (pyadaq_next_context_kv_transform, one call per layer
// and K or V; pyadaq/runtime/kv_transform.py chooses the transforms) stores each layer's keys and
// values in the calibration's coordinates: per KV head, with an orthonormal M and scales s > 0,
//
//     K~ = ((K - muK) . MK) / sK      Q~ = (Q . MK) * sK     (the logits change by Q.muK, the same
//     V~ = ((V - muV) . MV) / sV      out = (out~ * sV) . MV^T + muV      for every key of a query:
//                                                      softmax ignores it; the weights sum to 1)
//
// The query heads of a group use their KV head's transform; the means stay in the keys (values)
// of layers with attention-logit soft-capping or learned sinks, where the identities do not
// hold. The matrices live in a buffer of the layer's KV-cache device, made when the cache is made
// and freed with the context. M may be the identity (no matrix: the part only takes out its
// mean). Upstream's Hadamard rotation, if it is on, is applied after the transform (and undone
// before its inverse); pyadaq keeps it for keys that only lose their mean and turns it off for
// every side a matrix transforms.
// Without a calibration every hook returns at once and the graph is upstream's, node for node.
#pragma once

#include "ggml.h"

#include <cstdint>

struct llama_context;
struct llama_model;
class llama_kv_cache_context;

struct pyadaq_kv_transform;

// Called by llama_kv_cache's constructor for each layer with its own cache tensors, after they
// are allocated: makes the layer's transform if the context being created has a calibration
// for it. Throws std::runtime_error for a calibration that does not fit the layer.
void pyadaq_kv_transform_create(const llama_model & model, uint32_t il, ggml_tensor * k, ggml_tensor * v);

// llama_init_from_model: the transforms made while the context was built now belong to it
// (those of a context that failed are freed when pyadaq_layer_types_scope ends).
void pyadaq_kv_transform_attach(const llama_context * ctx);
// llama_free, after the context is deleted (the pointer is only a key).
void pyadaq_kv_transform_detach(const llama_context * ctx);

// The transform of the layer il of a KV cache context (nullptr: none; no calibrated context
// exists in the process, the lookup costs nothing and builds no node).
const pyadaq_kv_transform * pyadaq_kv_transform_of(ggml_context * ctx0, const llama_kv_cache_context * mctx,
                                                   int32_t il);

// build_attn, before upstream's rotation: Q, K, V [head, heads, tokens] into the layer's
// coordinates (k and v may be nullptr: a layer that reuses another layer's cache).
void pyadaq_attn_transform_in(ggml_context * ctx0, const pyadaq_kv_transform * tf, ggml_tensor ** q,
                              ggml_tensor ** k, ggml_tensor ** v);
// build_attn, after upstream's inverse rotation: attention's output [head_v * heads, tokens]
// back from the layer's V coordinates.
ggml_tensor * pyadaq_attn_transform_out(ggml_context * ctx0, const pyadaq_kv_transform * tf, ggml_tensor * cur);

// The K-shift of a layer whose keys are stored transformed: begin returns the whole cache
// tensor k of the layer in model coordinates (f32 [head, heads, cells]; upstream's rotation rot,
// if any, undone), or nullptr when the layer has no transform; end maps the shifted keys back
// and returns the copy into k.
ggml_tensor * pyadaq_kv_shift_begin(ggml_context * ctx, ggml_tensor * k, ggml_tensor * rot);
ggml_tensor * pyadaq_kv_shift_end(ggml_context * ctx, ggml_tensor * x, ggml_tensor * k, ggml_tensor * rot);

// The thread-local pending calibration (pyadaq-llama.cpp's scope takes and drops it with the
// rest of the next context's settings).
bool pyadaq_kv_transform_pending();
void pyadaq_kv_transform_take();     // pending -> active, for one llama_init_from_model
void pyadaq_kv_transform_release();  // drops the active one and any transform made for a failed context
void pyadaq_kv_transform_clear_pending();
