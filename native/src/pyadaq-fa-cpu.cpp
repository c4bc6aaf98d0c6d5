// CPU flash attention with quantized K/V caches: pyadaq's tiled kernel for prompt processing.
//
// Upstream's tiled flash attention (ggml-cpu/ops.cpp) takes one tile of 64 queries of one head at
// a time and walks the whole KV sequence for it, packing every tile of 64 K and V rows into f32
// tile buffers on the way. It packs only f16 and f32 rows of one type, and sends every other K/V
// pair to the per-row path, which dequantizes every V row once per query row. For a quantized
// row, packing is a dequantization, and walking the sequence once per query tile repeats it for
// every query tile and every query head of a GQA group (32 times per op for a 512-token batch
// with four query heads per KV head).
//
// This kernel takes the same tiles, the same f32 GEMMs and the same online softmax, in another
// order: a unit of work is up to PYADAQ_FA_UNIT_TILES query tiles that share their K and V heads
// (the query heads of a GQA group, or neighbouring position tiles of one head), and each KV tile is
// dequantized once per unit and used for all its query tiles. Each query tile keeps its own
// accumulators, so the unit's scratch is a fixed number of tiles, independent of the context:
// it lives in the op's work buffer, which the graph plan sizes through
// pyadaq_fa_tiled_work_size (patch 0006), and nothing else is allocated. K and V may be any
// quantized types with a to_float, pyadaq's and upstream's, in any pairing with each other and
// with f16/f32. f16/f16 and f32/f32 keep upstream's kernel.
//
// Batches shorter than a query tile (generation, and short prompts such as a chat turn: up to
// PYADAQ_FA_DECODE_ROWS queries) with a quantized V have a kernel of their own here too. Upstream's
// per-row path walks the KV sequence once per query row and head, so every K and V row is
// converted once per query of the batch and head of the group (4 heads on the embedded model),
// and for every row and head it adds the V row into the accumulator in memory after the softmax
// step of that row. This kernel takes the heads of a group together and
// the KV rows in tiles of DEC_TILE: each row is converted once, every query's scores of the tile are
// computed first (K through the type's vec_dot with Q in the vec_dot type, as upstream), one online
// softmax step per query covers the tile, and the tile's V rows (dequantized to f32) are added as
// one small GEMM whose accumulators stay in registers. The KV sequence is split into chunks that the
// threads share, each chunk's (max, sum, accumulator) is written to the work buffer, and the chunks
// are combined at the end, as upstream's split-KV path does for f16 caches.
//
// With a KV window (pyadaq-kv-window.h: f16 copies of the last cells' rows as the op's sources 5-7),
// both kernels read a cell's row from its copy while the window holds that cell, and they take
// every batch and every quantized pair (also the flat ones and f16 values), so that the window is
// read whatever the batch; upstream's paths, which would ignore it, run only without one.
//
// PYADAQ_FA_TILED=0 switches both off (the per-row path then runs, as upstream, and a window is not
// read).

#include "pyadaq-fa-cpu.h"
#include "pyadaq-quants.h"

#include "common.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "simd-gemm.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

// longest row packed through the stack (K head sizes of current models are at most 576)
#define PYADAQ_FA_MAX_ROW 4096
// query tiles of one unit of work: the accumulators each thread holds at once
#define PYADAQ_FA_UNIT_TILES 4
// batches shorter than a query tile (generation, short prompts such as a chat turn) take the
// generation kernel; a tile or more, the tiled kernel
#define PYADAQ_FA_DECODE_ROWS (GGML_FA_TILE_Q - 1)
// generation: query heads x rows of one unit of work, at most
#define PYADAQ_FA_DECODE_HR 1024

namespace {

constexpr int64_t QT = GGML_FA_TILE_Q;
constexpr int64_t KT = GGML_FA_TILE_KV;
constexpr int64_t NT = PYADAQ_FA_UNIT_TILES;
// per-thread regions start on their own cache lines (ggml-cpu's lines are at most 256 bytes)
constexpr int64_t LINE_F32 = 256 / sizeof(float);

static_assert(QT > 0 && KT > 0 && NT > 0, "tile sizes");
static_assert(NT <= 16, "a unit's accumulators must stay small");

int64_t g_tiled;   // ops with a quantized K or V that ran on the tiled kernel (for the tests)
int64_t g_decode;  // ops that ran on the generation kernel (for the tests)

bool enabled() {
    static int on = -1;
    if (on < 0) {
        const char * e = getenv("PYADAQ_FA_TILED");
        on = !(e && e[0] == '0');
    }
    return on != 0;
}

// f16/f32 rows are converted, quantized rows dequantized
bool quantized_packable(ggml_type type) {
    if (type == GGML_TYPE_F16 || type == GGML_TYPE_F32 || !ggml_is_quantized(type)) {
        return false;
    }
    return ggml_get_type_traits(type)->to_float != nullptr;
}

bool packable(ggml_type type) {
    return type == GGML_TYPE_F16 || type == GGML_TYPE_F32 || quantized_packable(type);
}

// The recent-token window of the op's cache (pyadaq-kv-window.h): sources 5 and 6 are f16 copies
// of the K and V rows of the last cells written (either may be absent: that side is not
// quantized), one slot per cell mod W, and source 7 the cell each slot holds (-1: none). A cell
// whose slot holds it is read from the copy. One stream only (the window's condition).
struct kv_window {
    const ggml_tensor * k    = nullptr;
    const ggml_tensor * v    = nullptr;
    const int32_t *     tags = nullptr;
    int64_t             W    = 0;

    explicit kv_window(const ggml_tensor * dst) {
        const ggml_tensor * t = dst->src[7];
        const ggml_tensor * kc = dst->src[1];
        const ggml_tensor * vc = dst->src[2];
        if (t == nullptr || t->type != GGML_TYPE_I32 || kc->ne[3] != 1 || vc->ne[3] != 1) {
            return;
        }
        const ggml_tensor * wk = dst->src[5];
        const ggml_tensor * wv = dst->src[6];
        if (wk != nullptr && (wk->type != GGML_TYPE_F16 || wk->ne[0] != kc->ne[0] * kc->ne[2] || wk->ne[1] <= t->ne[0])) {
            return;
        }
        if (wv != nullptr && (wv->type != GGML_TYPE_F16 || wv->ne[0] != vc->ne[0] * vc->ne[2] || wv->ne[1] <= t->ne[0])) {
            return;
        }
        if (wk == nullptr && wv == nullptr) {
            return;
        }
        k    = wk;
        v    = wv;
        tags = (const int32_t *) t->data;
        W    = t->ne[0];
    }

    bool on() const { return W > 0; }

    // head h's row of cell ic in copy w (the window's k or v), or nullptr: read the cache
    const ggml_fp16_t * row(const ggml_tensor * w, int64_t ic, int64_t h, int64_t d) const {
        if (w == nullptr) {
            return nullptr;
        }
        const int64_t slot = ic % W;
        if (tags[slot] != ic) {
            return nullptr;
        }
        return (const ggml_fp16_t *) ((const char *) w->data + slot * w->nb[1]) + h * d;
    }
};

// Whether this kernel computes the op: queries in f32, at least a tile of them, K/V types that
// upstream's tiled kernel does not take but this one packs. The graph plan's work size and the
// op itself ask the same question.
bool applies(const ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    // with a window, every batch: upstream's paths would read the quantized rows
    const int64_t min_rows = kv_window(dst).on() ? 1 : QT;
    if (!enabled() || q->type != GGML_TYPE_F32 || q->ne[1] < min_rows || k->ne[0] > PYADAQ_FA_MAX_ROW) {
        return false;
    }
    if (!packable(k->type) || !packable(v->type)) {
        return false;
    }
    if (!quantized_packable(k->type) && !quantized_packable(v->type) && k->type == v->type) {
        return false;  // f16/f16, f32/f32: upstream's own tiled kernel
    }
#if defined(GGML_SIMD) && !defined(__x86_64__) && !defined(_M_X64) && !defined(__ARM_FEATURE_SVE)
    if (v->ne[0] % GGML_F32_EPR != 0) {
        return false;  // upstream's condition for its tiled kernel on these targets
    }
#elif defined(__ARM_FEATURE_SVE)
    return false;  // upstream sizes its vectors at run time there; not taken over
#endif
    return true;
}

// floats of one thread's scratch
int64_t thread_floats(int64_t DK, int64_t DV) {
    const int64_t per_tile = QT * DK + QT * DV + 2 * QT;  // Q, output accumulator, S, M
    const int64_t shared   = 2 * QT * KT + KT * DK + KT * DV;  // scores, mask, K tile, V tile
    return (NT * per_tile + shared + LINE_F32 - 1) / LINE_F32 * LINE_F32;
}

// One row of a K or V tile: dst[0], dst[stride], ..., dst[(n-1)*stride].
void pack_row(ggml_type type, const void * src, float * dst, int64_t stride, int64_t n) {
    if (type == GGML_TYPE_F16) {
        const ggml_fp16_t * s = (const ggml_fp16_t *) src;
        if (stride == 1) {
            ggml_cpu_fp16_to_fp32(s, dst, n);
        } else {
            for (int64_t i = 0; i < n; ++i) {
                dst[i * stride] = GGML_CPU_FP16_TO_FP32(s[i]);
            }
        }
        return;
    }
    if (type == GGML_TYPE_F32) {
        const float * s = (const float *) src;
        if (stride == 1) {
            memcpy(dst, s, n * sizeof(float));
        } else {
            for (int64_t i = 0; i < n; ++i) {
                dst[i * stride] = s[i];
            }
        }
        return;
    }
    ggml_to_float_t to_float = ggml_get_type_traits(type)->to_float;
    if (stride == 1) {
        to_float(src, dst, n);
        return;
    }
    float row[PYADAQ_FA_MAX_ROW];
    to_float(src, row, n);
    for (int64_t i = 0; i < n; ++i) {
        dst[i * stride] = row[i];
    }
}

// The op's scalar parameters as both kernels use them (upstream's definitions): the scale of the
// scores (divided by the soft-cap when there is one) and each query head's ALiBi slope.
struct op_params {
    float    scale;
    float    max_bias;
    float    logit_softcap;
    uint32_t n_head_log2;
    float    m0, m1;

    explicit op_params(const ggml_tensor * dst) {
        memcpy(&scale,         (const float *) dst->op_params + 0, sizeof(float));
        memcpy(&max_bias,      (const float *) dst->op_params + 1, sizeof(float));
        memcpy(&logit_softcap, (const float *) dst->op_params + 2, sizeof(float));
        if (logit_softcap != 0) {
            scale /= logit_softcap;
        }
        n_head_log2 = 1u << (uint32_t) floor(log2((uint32_t) dst->src[0]->ne[2]));
        m0          = powf(2.0f, -(max_bias       ) / n_head_log2);
        m1          = powf(2.0f, -(max_bias / 2.0f) / n_head_log2);
    }

    float slope(int64_t h) const {
        return max_bias > 0.0f ? (h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2 * (h - n_head_log2) + 1)) : 1.0f;
    }
};

// the mask's row for query row iq1 of head h of sequence iq3
const ggml_fp16_t * mask_row(const ggml_tensor * mask, int64_t iq1, int64_t h, int64_t iq3) {
    return (const ggml_fp16_t *) ((const char *) mask->data + iq1 * mask->nb[1] + (h % mask->ne[2]) * mask->nb[2] +
                                  (iq3 % mask->ne[3]) * mask->nb[3]);
}

// consecutive query heads h0..h0+g-1 (h0 a multiple of g) share a K head and a V head when g
// divides both broadcast factors: the largest such g
int64_t head_group(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v) {
    int64_t a = q->ne[2] / k->ne[2], b = q->ne[2] / v->ne[2];
    while (b) {
        const int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

// How the op's query tiles are grouped into units.
struct shape {
    int64_t heads;      // query heads per unit, all on the same K head and V head
    int64_t pos_tiles;  // query-position tiles per unit
    int64_t n_pos;      // query-position tiles of a head
    int64_t n_units;
};

int64_t count_units(const ggml_tensor * q, int64_t heads, int64_t pos_tiles, int64_t n_pos) {
    return q->ne[3] * (q->ne[2] / heads) * ((n_pos + pos_tiles - 1) / pos_tiles);
}

shape make_shape(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v, int nth) {
    const int64_t group = head_group(q, k, v);
    const int64_t n_pos = (q->ne[1] + QT - 1) / QT;

    int64_t heads = 1;
    for (int64_t h = std::min<int64_t>(group, NT); h >= 1; --h) {
        if (group % h == 0) {
            heads = h;
            break;
        }
    }
    int64_t pos_tiles = std::min<int64_t>(NT / heads, n_pos);
    // enough units that every thread has several (the later position tiles of a causal mask
    // cost more than the first): give up sharing before leaving threads idle
    while (count_units(q, heads, pos_tiles, n_pos) < 4 * nth && (pos_tiles > 1 || heads > 1)) {
        if (pos_tiles > 1) {
            --pos_tiles;
        } else {
            int64_t h = heads - 1;
            while (h > 1 && group % h != 0) {
                --h;
            }
            heads = h;
        }
    }
    return { heads, pos_tiles, n_pos, count_units(q, heads, pos_tiles, n_pos) };
}

struct tile {
    int64_t iq1, iq2, iq3;  // first query row, query head, sequence
    int64_t rows;
    float   slope;
    float * Q;    // rows x DK
    float * VKQ;  // rows x DV
    float * S;
    float * M;
};

void run_unit(const ggml_compute_params * params, ggml_tensor * dst, const shape & sh, int64_t u) {
    const ggml_tensor * q     = dst->src[0];
    const ggml_tensor * k     = dst->src[1];
    const ggml_tensor * v     = dst->src[2];
    const ggml_tensor * mask  = dst->src[3];
    const ggml_tensor * sinks = dst->src[4];

    const int64_t DK   = k->ne[0];
    const int64_t DV   = v->ne[0];
    const int64_t N    = q->ne[1];
    const int64_t nek1 = k->ne[1];

    const op_params op(dst);
    const kv_window win(dst);

    // which tiles
    const int64_t n_pu  = (sh.n_pos + sh.pos_tiles - 1) / sh.pos_tiles;
    const int64_t n_hg  = q->ne[2] / sh.heads;
    const int64_t iq3   = u / (n_hg * n_pu);
    const int64_t hg    = (u / n_pu) % n_hg;
    const int64_t p0    = (u % n_pu) * sh.pos_tiles;
    const int64_t p1    = std::min(p0 + sh.pos_tiles, sh.n_pos);

    // scratch: this thread's region of the work buffer
    float * base   = (float *) params->wdata + params->ith * thread_floats(DK, DV);
    float * KQ     = base + NT * (QT * DK + QT * DV + 2 * QT);
    float * mask32 = KQ + QT * KT;
    float * K32    = mask32 + QT * KT;  // transposed: K32[dk*KT + kv]
    float * V32    = K32 + KT * DK;

    tile tiles[NT];
    int  nt = 0;
    for (int64_t h = hg * sh.heads; h < (hg + 1) * sh.heads; ++h) {
        for (int64_t p = p0; p < p1; ++p) {
            tile & t = tiles[nt];
            float * tb = base + nt * (QT * DK + QT * DV + 2 * QT);
            t.iq1   = p * QT;
            t.iq2   = h;
            t.iq3   = iq3;
            t.rows  = std::min(QT, N - t.iq1);
            t.slope = op.slope(h);
            t.Q     = tb;
            t.VKQ   = tb + QT * DK;
            t.S     = t.VKQ + QT * DV;
            t.M     = t.S + QT;
            for (int64_t r = 0; r < t.rows; ++r) {
                const char * pq = (const char *) q->data + (t.iq1 + r) * q->nb[1] + h * q->nb[2] + iq3 * q->nb[3];
                memcpy(t.Q + r * DK, pq, DK * sizeof(float));
                t.S[r] = 0.0f;
                t.M[r] = -INFINITY;
            }
            memset(t.VKQ, 0, t.rows * DV * sizeof(float));
            ++nt;
        }
    }
    GGML_ASSERT(nt > 0 && nt <= NT);

    // every tile of the unit reads the same K and V heads
    const int64_t ik2 = tiles[0].iq2 / (q->ne[2] / k->ne[2]);
    const int64_t ik3 = iq3 / (q->ne[3] / k->ne[3]);
    const int64_t iv2 = tiles[0].iq2 / (q->ne[2] / v->ne[2]);
    const int64_t iv3 = iq3 / (q->ne[3] / v->ne[3]);

    // the rows of a last, partial KV tile beyond the sequence: finite (zero), masked out of the scores
    memset(K32, 0, KT * DK * sizeof(float));
    memset(V32, 0, KT * DV * sizeof(float));

    for (int64_t ic = 0; ic < nek1; ic += KT) {
        const int64_t kv_tile  = std::min(KT, nek1 - ic);
        bool          k_packed = false;
        bool          v_packed = false;

        for (int it = 0; it < nt; ++it) {
            tile & t = tiles[it];

            if (mask) {
                bool can_skip = true;
                for (int64_t r = 0; r < t.rows; ++r) {
                    const ggml_fp16_t * mp = mask_row(mask, t.iq1 + r, t.iq2, t.iq3);
                    float * m32 = mask32 + r * KT;
                    for (int64_t c = 0; c < kv_tile; ++c) {
                        m32[c] = t.slope * GGML_CPU_FP16_TO_FP32(mp[ic + c]);
                        can_skip &= m32[c] == -INFINITY;
                    }
                    for (int64_t c = kv_tile; c < KT; ++c) {
                        m32[c] = -INFINITY;
                    }
                }
                if (can_skip) {
                    continue;
                }
            }

            if (!k_packed) {
                for (int64_t c = 0; c < kv_tile; ++c) {
                    if (const ggml_fp16_t * w = win.row(win.k, ic + c, ik2, DK)) {
                        pack_row(GGML_TYPE_F16, w, K32 + c, KT, DK);
                        continue;
                    }
                    const char * kd = (const char *) k->data + (ic + c) * k->nb[1] + ik2 * k->nb[2] + ik3 * k->nb[3];
                    pack_row(k->type, kd, K32 + c, KT, DK);
                }
                k_packed = true;
            }

            memset(KQ, 0, t.rows * KT * sizeof(float));
            simd_gemm(KQ, t.Q, K32, (int) t.rows, (int) DK, (int) KT);
            ggml_vec_scale_f32((int) (t.rows * KT), KQ, op.scale);
            if (op.logit_softcap != 0.0f) {
                ggml_vec_tanh_f32((int) (t.rows * KT), KQ, KQ);
                ggml_vec_scale_f32((int) (t.rows * KT), KQ, op.logit_softcap);
            }
            if (mask) {
                ggml_vec_add_f32((int) (t.rows * KT), KQ, KQ, mask32);
            } else {
                for (int64_t r = 0; r < t.rows; ++r) {
                    for (int64_t c = kv_tile; c < KT; ++c) {
                        KQ[r * KT + c] = -INFINITY;
                    }
                }
            }

            // online softmax, row by row
            for (int64_t r = 0; r < t.rows; ++r) {
                float * kq = KQ + r * KT;
                float   tile_max;
                ggml_vec_max_f32((int) KT, &tile_max, kq);
                if (tile_max == -INFINITY) {
                    memset(kq, 0, KT * sizeof(float));  // nothing of this tile for this row
                    continue;
                }
                const float Mold = t.M[r];
                const float Mnew = fmaxf(Mold, tile_max);
                if (Mnew > Mold) {
                    const float ms = expf(Mold - Mnew);
                    ggml_vec_scale_f32((int) DV, t.VKQ + r * DV, ms);
                    t.S[r] *= ms;
                }
                t.M[r] = Mnew;
                t.S[r] += (float) ggml_vec_soft_max_f32((int) KT, kq, kq, Mnew);
            }

            if (!v_packed) {
                for (int64_t c = 0; c < kv_tile; ++c) {
                    if (const ggml_fp16_t * w = win.row(win.v, ic + c, iv2, DV)) {
                        pack_row(GGML_TYPE_F16, w, V32 + c * DV, 1, DV);
                        continue;
                    }
                    const char * vd = (const char *) v->data + (ic + c) * v->nb[1] + iv2 * v->nb[2] + iv3 * v->nb[3];
                    pack_row(v->type, vd, V32 + c * DV, 1, DV);
                }
                v_packed = true;
            }
            simd_gemm(t.VKQ, KQ, V32, (int) t.rows, (int) KT, (int) DV);
        }
    }

    const int64_t ne1 = dst->ne[1];
    const int64_t ne2 = dst->ne[2];
    const size_t  nb1 = dst->nb[1];
    for (int it = 0; it < nt; ++it) {
        tile & t = tiles[it];
        if (sinks) {
            const float s = ((const float *) sinks->data)[t.iq2];
            for (int64_t r = 0; r < t.rows; ++r) {
                float ms = 1.0f;
                float vs = 1.0f;
                if (s > t.M[r]) {
                    ms = expf(t.M[r] - s);
                    ggml_vec_scale_f32((int) DV, t.VKQ + r * DV, ms);
                } else {
                    vs = expf(s - t.M[r]);
                }
                t.S[r] = t.S[r] * ms + vs;
            }
        }
        for (int64_t r = 0; r < t.rows; ++r) {
            const float S_inv = t.S[r] == 0.0f ? 0.0f : 1.0f / t.S[r];
            ggml_vec_scale_f32((int) DV, t.VKQ + r * DV, S_inv);
            const int64_t i1 = t.iq1 + r;
            // permute(0, 2, 1, 3)
            memcpy((char *) dst->data + (t.iq3 * ne2 * ne1 + t.iq2 + i1 * ne1) * nb1, t.VKQ + r * DV, nb1);
        }
    }
}


// ---------------------------------------------------------------------------------------------
// generation: the query heads of a GQA group together, the KV sequence in chunks shared by threads
// ---------------------------------------------------------------------------------------------

// KV rows per chunk, at least (fewer chunks than threads rather than chunks this short)
constexpr int64_t DEC_MIN_CHUNK = 128;
// floats of the units' partial results beyond which a batch's KV rows are cut into fewer chunks
constexpr int64_t DEC_MAX_PARTIALS = 256 * 1024;
// KV rows per tile of the generation kernel: its V rows in f32 (32 KiB at 256 values) stay in L1/L2
constexpr int64_t DEC_TILE = 32;
static_assert(DEC_TILE > 0 && DEC_MIN_CHUNK % DEC_TILE == 0, "generation tiles");

// Whether the generation kernel computes the op: f32 queries, a short batch, a quantized V (f16 and
// f32 values stay upstream's, which adds f16 values in f16, unless a window must be read) and a K
// type with a dot product. Every quantized V takes it, the flat types too: with a tile's rows scored
// first and added as one small GEMM it is faster than upstream's per-row path for them as well
// (docs/CALIBRATION.md, section Speed).
bool decode_applies(const ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    // with a window, f16 values too (upstream's path would not read the window)
    const bool win = kv_window(dst).on();
    if (!enabled() || q->type != GGML_TYPE_F32 || q->ne[1] < 1 || q->ne[1] > PYADAQ_FA_DECODE_ROWS ||
        k->ne[0] > PYADAQ_FA_MAX_ROW || v->ne[0] > PYADAQ_FA_MAX_ROW ||
        !(quantized_packable(v->type) || (win && packable(v->type)))) {
        return false;
    }
    if (q->ne[2] % k->ne[2] != 0 || q->ne[2] % v->ne[2] != 0 ||
        head_group(q, k, v) * q->ne[1] > PYADAQ_FA_DECODE_HR) {
        return false;
    }
    const auto * kt = ggml_get_type_traits_cpu(k->type);
    if (kt->vec_dot == nullptr) {
        return false;
    }
    if (kt->vec_dot_type != GGML_TYPE_F32) {
        return ggml_get_type_traits_cpu(kt->vec_dot_type)->from_float != nullptr;
    }
    return k->type == GGML_TYPE_F32 || quantized_packable(k->type);  // K rows in float, dequantized once
}

// How the op is cut into units (sequence, head group, KV chunk) and where each lives in the work
// buffer: per thread its scratch, then per unit its partial results.
struct dec_shape {
    int64_t g, n_hg, hr;      // heads per group, head groups, query rows x heads of a unit
    int64_t n_chunks;         // chunks of each group's visible KV rows
    int64_t n_units;
    int64_t q_floats;         // floats that one query row takes in the K type's vec_dot type (0: f32, read in place)
    int64_t thread_floats;    // scratch per thread, whole cache lines
    int64_t unit_floats;      // partials per unit: M[hr], S[hr], VKQ[hr][DV]
    int64_t outer;            // sequences x head groups: each has its visible rows [lo, hi) (two int64)
};

dec_shape make_dec_shape(const ggml_tensor * dst, int nth) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    dec_shape d{};
    d.g    = head_group(q, k, v);
    d.n_hg = q->ne[2] / d.g;
    d.hr   = d.g * q->ne[1];
    const int64_t nek1  = k->ne[1];
    const int64_t outer = q->ne[3] * d.n_hg;
    d.outer    = outer;
    d.n_chunks = 1;
    if (outer < 4 * nth) {
        d.n_chunks = std::max<int64_t>(1, std::min<int64_t>((4 * nth + outer - 1) / outer, nek1 / DEC_MIN_CHUNK));
        // every unit's partials (an accumulator per query row) stay within DEC_MAX_PARTIALS floats
        // where a unit holds many query rows (a batch of up to 63), keeping a unit per thread
        const int64_t unit  = d.hr * (2 + v->ne[0]);
        const int64_t fit   = std::max<int64_t>(1, DEC_MAX_PARTIALS / (outer * unit));
        const int64_t least = (nth + outer - 1) / outer;
        d.n_chunks = std::min(d.n_chunks, std::max(fit, least));
    }
    d.n_units = outer * d.n_chunks;
    const ggml_type vdt = ggml_get_type_traits_cpu(k->type)->vec_dot_type;
    d.q_floats = vdt == GGML_TYPE_F32 ? 0
                                      : (int64_t) ((ggml_row_size(vdt, k->ne[0]) + sizeof(float) - 1) / sizeof(float));
    // K row, V tile, scores, converted queries
    const int64_t t = k->ne[0] + DEC_TILE * v->ne[0] + d.hr * DEC_TILE + d.hr * d.q_floats;
    d.thread_floats = (t + LINE_F32 - 1) / LINE_F32 * LINE_F32;
    d.unit_floats   = d.hr * (2 + v->ne[0]);
    return d;
}

// the units' partials, rounded up so that the ranges after them are 8-byte aligned
int64_t partial_floats(const dec_shape & d) {
    return (d.unit_floats * d.n_units + 1) / 2 * 2;
}

size_t dec_work_bytes(const dec_shape & d, int nth) {
    return (size_t) (d.thread_floats * nth + partial_floats(d)) * sizeof(float) + 2 * sizeof(int64_t) * d.outer;
}

// The KV rows [lo, hi) outside which the mask hides every row from every query of head group hg of
// sequence iq3 (all rows without a mask): the chunks split these, so that a sliding window's few
// visible rows are shared by the threads like a whole sequence.
void visible_rows(const ggml_tensor * dst, const dec_shape & d, int64_t iq3, int64_t hg, int64_t * lo, int64_t * hi) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * mask = dst->src[3];
    const int64_t       nek1 = k->ne[1];
    if (mask == nullptr) {
        *lo = 0;
        *hi = nek1;
        return;
    }
    const ggml_fp16_t neg_inf = GGML_CPU_FP32_TO_FP16(-INFINITY);
    int64_t a = nek1, b = 0;
    for (int64_t j = 0; j < d.g; ++j) {
        const int64_t h = hg * d.g + j;
        for (int64_t r = 0; r < q->ne[1]; ++r) {
            const ggml_fp16_t * mp = mask_row(mask, r, h, iq3);
            int64_t first = 0;
            while (first < a && mp[first] == neg_inf) {
                ++first;
            }
            a = first;
            int64_t last = nek1;
            while (last > b && mp[last - 1] == neg_inf) {
                --last;
            }
            b = last;
        }
    }
    *lo = a;
    *hi = std::max(a, b);
}

void run_decode_unit(const ggml_compute_params * params, ggml_tensor * dst, const dec_shape & d, int64_t u,
                     float * partials, const int64_t * ranges) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * mask = dst->src[3];

    const int64_t DK = k->ne[0];
    const int64_t DV = v->ne[0];
    const int64_t N  = q->ne[1];

    const op_params op(dst);
    const kv_window win(dst);

    const auto *            kt       = ggml_get_type_traits_cpu(k->type);
    const bool              k_float  = kt->vec_dot_type == GGML_TYPE_F32;
    const ggml_vec_dot_t    kq_dot   = kt->vec_dot;
    const ggml_from_float_t q_conv   = k_float ? nullptr : ggml_get_type_traits_cpu(kt->vec_dot_type)->from_float;
    const ggml_to_float_t   k_to_f32 = k->type == GGML_TYPE_F32 ? nullptr : ggml_get_type_traits(k->type)->to_float;
    // f32 values (taken with a window only) have no to_float: copied as they are
    const ggml_to_float_t   v_to_f32 = v->type == GGML_TYPE_F32 ? nullptr : ggml_get_type_traits(v->type)->to_float;

    const int64_t c   = u % d.n_chunks;
    const int64_t hg  = (u / d.n_chunks) % d.n_hg;
    const int64_t iq3 = u / (d.n_chunks * d.n_hg);
    const int64_t h0  = hg * d.g;
    const int64_t ik2 = h0 / (q->ne[2] / k->ne[2]);
    const int64_t iv2 = h0 / (q->ne[2] / v->ne[2]);
    const int64_t ik3 = iq3 / (q->ne[3] / k->ne[3]);
    const int64_t iv3 = iq3 / (q->ne[3] / v->ne[3]);
    // this unit's chunk of the group's visible rows
    const int64_t lo    = ranges[2 * (iq3 * d.n_hg + hg)];
    const int64_t hi    = ranges[2 * (iq3 * d.n_hg + hg) + 1];
    const int64_t chunk = (hi - lo + d.n_chunks - 1) / d.n_chunks;
    const int64_t ic0   = std::min(hi, lo + c * chunk);
    const int64_t ic1   = std::min(hi, ic0 + chunk);

    float * K32 = (float *) params->wdata + params->ith * d.thread_floats;
    float * Vt  = K32 + DK;            // the tile's V rows in f32, DEC_TILE x DV
    float * St  = Vt + DEC_TILE * DV;  // the tile's scores, then weights: hr x DEC_TILE
    float * Qc  = St + d.hr * DEC_TILE;

    float * M   = partials + u * d.unit_floats;
    float * S   = M + d.hr;
    float * VKQ = S + d.hr;

    // query row r of head h0 + j is item j * N + r
    const void *        qrow[PYADAQ_FA_DECODE_HR];  // in K's vec_dot type, for a quantized K row
    const float *       qf32[PYADAQ_FA_DECODE_HR];  // as they are, for a float K row
    const ggml_fp16_t * mrow[PYADAQ_FA_DECODE_HR];
    float               slope[PYADAQ_FA_DECODE_HR];
    float               mv[PYADAQ_FA_DECODE_HR];
    for (int64_t j = 0; j < d.g; ++j) {
        const int64_t h  = h0 + j;
        const float   sl = op.slope(h);
        for (int64_t r = 0; r < N; ++r) {
            const int64_t i  = j * N + r;
            const char *  pq = (const char *) q->data + r * q->nb[1] + h * q->nb[2] + iq3 * q->nb[3];
            qf32[i] = (const float *) pq;
            qrow[i] = nullptr;
            if (!k_float) {
                q_conv((const float *) pq, Qc + i * d.q_floats, DK);
                qrow[i] = Qc + i * d.q_floats;
            }
            mrow[i]  = mask ? mask_row(mask, r, h, iq3) : nullptr;
            slope[i] = sl;
            M[i]     = -INFINITY;
            S[i]     = 0.0f;
        }
    }
    memset(VKQ, 0, d.hr * DV * sizeof(float));

    // Tiles of DEC_TILE rows: every query's scores of the tile first (row by row, each K row
    // converted once), then one online-softmax step per query for the whole tile, then the
    // weighted V rows added as one small GEMM, VKQ[hr x DV] += P[hr x n] V[n x DV], whose
    // accumulators stay in registers across the tile's rows.
    for (int64_t t0 = ic0; t0 < ic1; t0 += DEC_TILE) {
        const int64_t t1 = std::min(ic1, t0 + DEC_TILE);
        int64_t       n  = 0;  // rows of this tile that some query sees
        for (int64_t ic = t0; ic < t1; ++ic) {
            bool any = false;
            for (int64_t i = 0; i < d.hr; ++i) {
                mv[i] = mrow[i] ? slope[i] * GGML_CPU_FP16_TO_FP32(mrow[i][ic]) : 0.0f;
                any |= mv[i] != -INFINITY;
            }
            if (!any) {
                continue;  // no query of the group sees this row: nothing of it is read
            }
            const char *  k_data = (const char *) k->data + ic * k->nb[1] + ik2 * k->nb[2] + ik3 * k->nb[3];
            const char *  v_data = (const char *) v->data + ic * v->nb[1] + iv2 * v->nb[2] + iv3 * v->nb[3];
            const float * kf     = nullptr;
            const ggml_fp16_t * wk = win.row(win.k, ic, ik2, DK);
            const ggml_fp16_t * wv = win.row(win.v, ic, iv2, DV);
            if (wk != nullptr) {
                ggml_cpu_fp16_to_fp32(wk, K32, DK);
                kf = K32;
            } else if (k_float) {
                if (k_to_f32 == nullptr) {
                    kf = (const float *) k_data;
                } else {
                    k_to_f32(k_data, K32, DK);
                    kf = K32;
                }
            }
            float * vrow = Vt + n * DV;
            if (wv != nullptr) {
                ggml_cpu_fp16_to_fp32(wv, vrow, DV);
            } else if (v_to_f32 == nullptr) {
                memcpy(vrow, v_data, DV * sizeof(float));
            } else {
                v_to_f32(v_data, vrow, DV);
            }
            for (int64_t i = 0; i < d.hr; ++i) {
                float s = -INFINITY;
                if (mv[i] != -INFINITY) {
                    if (kf != nullptr) {  // a window's row or a float K row: dotted with Q in f32
                        ggml_vec_dot_f32((int) DK, &s, 0, kf, 0, qf32[i], 0, 1);
                    } else {
                        kq_dot((int) DK, &s, 0, k_data, 0, qrow[i], 0, 1);
                    }
                    s = s * op.scale;
                    if (op.logit_softcap != 0.0f) {
                        s = op.logit_softcap * tanhf(s);
                    }
                    s += mv[i];
                }
                St[i * DEC_TILE + n] = s;
            }
            ++n;
        }
        if (n == 0) {
            continue;
        }
        for (int64_t i = 0; i < d.hr; ++i) {
            // packed as P[hr x n] for the GEMM (row i moves down to i * n)
            float * p = St + i * n;
            if (n < DEC_TILE && i > 0) {
                memmove(p, St + i * DEC_TILE, n * sizeof(float));
            }
            float tile_max;
            ggml_vec_max_f32((int) n, &tile_max, p);
            if (tile_max == -INFINITY) {
                memset(p, 0, n * sizeof(float));  // nothing of this tile for this query
                continue;
            }
            const float Mnew = fmaxf(M[i], tile_max);
            if (Mnew > M[i]) {  // a new maximum: what was added so far is scaled down
                const float ms = expf(M[i] - Mnew);
                ggml_vec_scale_f32((int) DV, VKQ + i * DV, ms);
                S[i] *= ms;
                M[i] = Mnew;
            }
            S[i] += (float) ggml_vec_soft_max_f32((int) n, p, p, Mnew);
        }
        simd_gemm(VKQ, St, Vt, (int) d.hr, (int) n, (int) DV);
    }
}

// Query row r of head h of sequence iq3: its chunks combined, the sink added, written to dst.
// acc: DV floats of scratch.
void finish_decode_row(ggml_tensor * dst, const dec_shape & d, int64_t iq3, int64_t h, int64_t r,
                       const float * partials, float * acc) {
    const ggml_tensor * q     = dst->src[0];
    const ggml_tensor * v     = dst->src[2];
    const ggml_tensor * sinks = dst->src[4];
    const int64_t       DV    = v->ne[0];
    const int64_t       i     = (h % d.g) * q->ne[1] + r;
    const int64_t       u0    = (iq3 * d.n_hg + h / d.g) * d.n_chunks;

    float Mx = -INFINITY;
    for (int64_t c = 0; c < d.n_chunks; ++c) {
        Mx = fmaxf(Mx, partials[(u0 + c) * d.unit_floats + i]);
    }
    float S = 0.0f;
    memset(acc, 0, DV * sizeof(float));
    if (Mx != -INFINITY) {
        for (int64_t c = 0; c < d.n_chunks; ++c) {
            const float * P  = partials + (u0 + c) * d.unit_floats;
            const float   Mc = P[i];
            if (Mc == -INFINITY) {
                continue;
            }
            const float f = expf(Mc - Mx);
            S += P[d.hr + i] * f;
            ggml_vec_mad_f32((int) DV, acc, P + 2 * d.hr + i * DV, f);
        }
    }
    if (sinks) {
        const float s  = ((const float *) sinks->data)[h];
        float       ms = 1.0f;
        float       vs = 1.0f;
        if (s > Mx) {
            ms = expf(Mx - s);
            ggml_vec_scale_f32((int) DV, acc, ms);
        } else {
            vs = expf(s - Mx);
        }
        S = S * ms + vs;
    }
    ggml_vec_scale_f32((int) DV, acc, S == 0.0f ? 0.0f : 1.0f / S);
    // permute(0, 2, 1, 3)
    const int64_t ne1 = dst->ne[1];
    const int64_t ne2 = dst->ne[2];
    memcpy((char *) dst->data + (iq3 * ne2 * ne1 + h + r * ne1) * dst->nb[1], acc, dst->nb[1]);
}

void run_decode(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    GGML_ASSERT(q->nb[0] == sizeof(float) && k->nb[0] == ggml_type_size(k->type) && v->nb[0] == ggml_type_size(v->type));
    GGML_ASSERT(q->ne[0] == k->ne[0] && dst->ne[0] == v->ne[0] && dst->nb[0] == sizeof(float));
    GGML_ASSERT(q->ne[3] % k->ne[3] == 0 && q->ne[3] % v->ne[3] == 0);

    const int       ith = params->ith;
    const int       nth = params->nth;
    const dec_shape d   = make_dec_shape(dst, nth);
    GGML_ASSERT(dec_work_bytes(d, nth) <= params->wsize);
    float *   partials = (float *) params->wdata + nth * d.thread_floats;
    int64_t * ranges   = (int64_t *) (partials + partial_floats(d));

    if (ith == 0) {
        __atomic_add_fetch(&g_decode, 1, __ATOMIC_RELAXED);
        ggml_threadpool_chunk_set(params->threadpool, nth);
    }
    for (int64_t o = ith; o < d.outer; o += nth) {
        visible_rows(dst, d, o / d.n_hg, o % d.n_hg, ranges + 2 * o, ranges + 2 * o + 1);
    }
    ggml_barrier(params->threadpool);
    for (int64_t u = ith; u < d.n_units; u = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        run_decode_unit(params, dst, d, u, partials, ranges);
    }
    ggml_barrier(params->threadpool);

    float *       acc   = (float *) params->wdata + ith * d.thread_floats + k->ne[0];  // the thread's V row
    const int64_t N     = q->ne[1];
    const int64_t items = q->ne[3] * q->ne[2] * N;
    for (int64_t it = ith; it < items; it += nth) {
        finish_decode_row(dst, d, it / (N * q->ne[2]), (it / N) % q->ne[2], it % N, partials, acc);
    }
}

}  // namespace

extern "C" {

int64_t pyadaq_cpu_fa_tiled(void) {
    return __atomic_load_n(&g_tiled, __ATOMIC_RELAXED);
}

int64_t pyadaq_cpu_fa_decode(void) {
    return __atomic_load_n(&g_decode, __ATOMIC_RELAXED);
}

size_t pyadaq_fa_tiled_work_size(const struct ggml_tensor * node, int n_tasks) {
    if (decode_applies(node)) {
        return dec_work_bytes(make_dec_shape(node, n_tasks), n_tasks);
    }
    if (!applies(node)) {
        return 0;
    }
    return (size_t) thread_floats(node->src[1]->ne[0], node->src[2]->ne[0]) * n_tasks * sizeof(float);
}

bool pyadaq_fa_tiled(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    if (params->use_ref) {
        return false;
    }
    if (decode_applies(dst)) {
        run_decode(params, dst);
        return true;
    }
    if (!applies(dst)) {
        return false;
    }
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    GGML_ASSERT(q->nb[0] == sizeof(float) && k->nb[0] == ggml_type_size(k->type) && v->nb[0] == ggml_type_size(v->type));
    GGML_ASSERT(q->ne[0] == k->ne[0] && dst->ne[0] == v->ne[0] && dst->nb[0] == sizeof(float));
    GGML_ASSERT(q->ne[2] % k->ne[2] == 0 && q->ne[2] % v->ne[2] == 0);
    GGML_ASSERT(q->ne[3] % k->ne[3] == 0 && q->ne[3] % v->ne[3] == 0);

    const int ith = params->ith;
    const int nth = params->nth;
    const shape sh = make_shape(q, k, v, nth);

    if (ith == 0) {
        __atomic_add_fetch(&g_tiled, 1, __ATOMIC_RELAXED);
        ggml_threadpool_chunk_set(params->threadpool, nth);
    }
    ggml_barrier(params->threadpool);

    for (int64_t u = ith; u < sh.n_units; u = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        run_unit(params, dst, sh, u);
    }
    return true;
}

}  // extern "C"
