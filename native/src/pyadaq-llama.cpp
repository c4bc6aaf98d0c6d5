// llama-level entry points of pyadaq, exported from libllama. They use only llama.cpp's
// public C API and the public methods of its memory interface; no struct layout changes.

#include "llama.h"
#include "llama-memory.h"

#include "pyadaq-quants.h"

#include <cstdint>

extern "C" {

// Bytes of the buffers that hold the context's KV cache (all layers, K and V, every
// device), as llama.cpp allocated them; -1 if the context has no memory module.
PYADAQ_API int64_t pyadaq_kv_cache_bytes(const struct llama_context * ctx);

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
