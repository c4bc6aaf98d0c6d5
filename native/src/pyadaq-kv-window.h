// The recent-token window: the hooks upstream's sources call (native/patches/0017), internal to
// libllama. The exported C entry point is declared in pyadaq-kv-window.cpp.
//
// A context created with a window of W cells (pyadaq_next_context_kv_window) keeps, beside every
// layer's quantized K and V cache, an f16 copy of the rows of the last W cells written: per cache
// (the iSWA model's two caches each have their own), W + 1 f16 rows per quantized layer side and
// one int32 tag per slot. Cell c's row goes to slot c mod W as well as to the quantized cache, and
// the slot's tag names the cell it holds (when a batch writes two cells of one slot, the later one
// keeps it; the other goes to the spare row W). Flash attention gets the copies and the tags as its
// sources 5, 6 and 7, and pyadaq's CPU kernels (pyadaq-fa-cpu.cpp) read a cell's row from its slot
// whenever the slot's tag names that cell: the tokens written last, and all tokens of a context
// shorter than W, are attended at f16 precision, the older ones at the cache's own. Other
// backends' kernels ignore the extra sources and read the quantized rows: the same attention
// as without a window.
//
// The copies are exact for as long as the cells hold what was written: a K-shift (which rotates
// the keys in place), reading a state and clearing the cache empty the window (every tag -1), so
// those cells are read from the quantized cache until they are written again. Caches of several
// streams (n_seq_max > 1 without a unified KV cache), hybrid models and DFlash drafts get no window. Without a window every hook
// returns at once and the graph is upstream's, node for node.
#pragma once

#include "ggml.h"

#include <cstdint>
#include <functional>

struct llama_context;
struct llama_model;
struct ggml_cgraph;
class llama_kv_cache_context;
class llm_graph_result;

// the next-context slot (pyadaq_layer_types_scope, pyadaq-llama.cpp)
bool pyadaq_kv_window_pending();
void pyadaq_kv_window_clear_pending();
void pyadaq_kv_window_take();
void pyadaq_kv_window_release();

// llama_kv_cache's constructor, for each layer with its cache tensors (after they are allocated).
// Hybrid models (recurrent + attention memory) and DFlash drafts get no window: their graphs
// reuse an attention input whose cache context is not refreshed, or write K/V rows outside
// build_attn, so a window could hold rows the cache no longer has.
void pyadaq_kv_window_create(const llama_model & model, const void * cache, uint32_t il, ggml_tensor * k,
                             ggml_tensor * v);
// llama_init_from_model / llama_free
void pyadaq_kv_window_attach(const llama_context * ctx);
void pyadaq_kv_window_detach(const llama_context * ctx);
// the cells no longer hold what was written to them (K-shift, state read, clear)
void pyadaq_kv_window_invalidate(const void * cache);

// build_attn, after the cache writes: the same rows into the layer's window (mctx: the cache
// context of the ubatch being processed, asked again at every ubatch, as the input's own).
void pyadaq_kv_window_write(ggml_context * ctx0, ggml_cgraph * gf, llm_graph_result * res,
                            const std::function<const llama_kv_cache_context *()> & mctx, int32_t il,
                            ggml_tensor * k_cur, ggml_tensor * v_cur);
// build_attn, after build_attn_mha: the flash-attention node under cur reads the layer's window
void pyadaq_kv_window_attend(ggml_context * ctx0, const llama_kv_cache_context * mctx, int32_t il, ggml_tensor * cur);
