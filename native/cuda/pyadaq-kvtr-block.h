// Block-level arithmetic of the row-trellis types (kvt2r, kvt3r) shared by the CUDA kernels and a
// host-side test, as pyadaq-kvt-block.h is for the kvt types.
//
// The reference is native/src/pyadaq-kvt.c ("Row-trellis types"): a block is a row of 256 values,
// four sub-blocks of 64 with a kvt scale code each (kvt's search on the sub-block, with the row
// type's profile), then one little-endian bit stream per width of the profile, widest first, each
// holding that width's values in row order. Widths above PYADAQ_KVTR_MAX_TRELLIS are kvt's
// Lloyd-Max indices; narrower ones a tail-biting bitshift trellis: value t decodes as
// d * table_k[W], W = the S stream bits before its own (read circularly) | its k bits << S.
//
// The encoder is a Viterbi search over the 2^S = 64 states, run here by one warp: lane l keeps
// states l and l + 32, the costs and the back-pointers live in a scratch area (shared memory on
// the GPU). The warp's program is written once, as phases separated by PYADAQ_WARP_SYNC, each a
// loop over lanes (PYADAQ_WARP_FOR): on the GPU every lane runs its own iteration, on the host the
// loop runs the 32 lanes in turn, so the host build (kvq-block-check.cpp) executes the same float
// operations in the same order and the test compares its bytes with the reference's. No phase
// reads what another lane writes in the same phase.
// Every float operation is the reference's, explicitly rounded; as for the kvt types, denormal
// values can differ under -use_fast_math (flushed to zero on the GPU).

#pragma once

#include "pyadaq-kvt-block.h"
#include "pyadaq-kvt-trellis.h"

#define PYADAQ_KVTR_NS (1 << PYADAQ_KVTR_STATE_BITS)
static_assert(PYADAQ_KVTR_NS == 64, "a warp keeps two states per lane");
static_assert(PYADAQ_KVTR_QK == 256 && PYADAQ_KVTR_SUBS * PYADAQ_KVT_QK == PYADAQ_KVTR_QK, "a row is 4 kvt blocks");
static_assert(PYADAQ_KVTR_MAX_TRELLIS == 3, "tables exist for widths 1..3");

#define PYADAQ_KVTR_TABLES(QUAL, prefix)                                    \
    QUAL float prefix##1[2 * PYADAQ_KVTR_NS] = PYADAQ_KVTR_TABLE_1;        \
    QUAL float prefix##2[4 * PYADAQ_KVTR_NS] = PYADAQ_KVTR_TABLE_2;        \
    QUAL float prefix##3[8 * PYADAQ_KVTR_NS] = PYADAQ_KVTR_TABLE_3;

PYADAQ_KVTR_TABLES(static const, pyadaq_kvtr_host_table_)
#if defined(__CUDACC__)
// global memory, not __constant__: the lanes of a warp read different entries
PYADAQ_KVTR_TABLES(static const __device__, pyadaq_kvtr_dev_table_)
#endif

// Entry W of width k's table (k = 1..3).
PYADAQ_HD float pyadaq_kvtr_table(int k, int W) {
#if defined(__CUDA_ARCH__)
#    define PYADAQ_KVTR_T(n) pyadaq_kvtr_dev_table_##n
#else
#    define PYADAQ_KVTR_T(n) pyadaq_kvtr_host_table_##n
#endif
    return k == 1 ? PYADAQ_KVTR_T(1)[W] : k == 2 ? PYADAQ_KVTR_T(2)[W] : PYADAQ_KVTR_T(3)[W];
#undef PYADAQ_KVTR_T
}

// Whether a type id is a row type.
#define PYADAQ_KVTR_IS_ID(UPPER, lower, id, ...) || ID == (id)
template <int ID> PYADAQ_HD constexpr bool pyadaq_kvt_is_row() {
    return false PYADAQ_KVTR_TYPES(PYADAQ_KVTR_IS_ID);
}
#undef PYADAQ_KVTR_IS_ID

// Values per block: 256 for a row type, 64 for a kvt type.
template <int ID> PYADAQ_HD constexpr int pyadaq_kvt_qk() {
    return pyadaq_kvt_is_row<ID>() ? PYADAQ_KVTR_QK : PYADAQ_KVT_QK;
}

// The streams' geometry: how many groups of a sub-block have width k, the first of them (a
// profile descends, so they are consecutive), the stream's length in values and its first bit.
template <int ID> PYADAQ_HD constexpr int pyadaq_kvtr_groups(int k) {
    int n = 0;
    for (int g = 0; g < 8; ++g) {
        n += pyadaq_kvt_width<ID>(g) == k;
    }
    return n;
}
template <int ID> PYADAQ_HD constexpr int pyadaq_kvtr_first_group(int k) {
    int g = 0;
    while (g < 8 && pyadaq_kvt_width<ID>(g) != k) {
        ++g;
    }
    return g;
}
template <int ID> PYADAQ_HD constexpr int pyadaq_kvtr_stream_len(int k) {
    return PYADAQ_KVTR_SUBS * PYADAQ_KVT_GROUP * pyadaq_kvtr_groups<ID>(k);
}
template <int ID> PYADAQ_HD constexpr int pyadaq_kvtr_stream_bit(int k) {
    int bit = 0;
    for (int k2 = PYADAQ_KVT_MAX_BITS; k2 > k; --k2) {
        bit += pyadaq_kvtr_stream_len<ID>(k2) * k2;
    }
    return bit;
}
// The row position (0..255) of value t of width k's stream.
template <int ID> PYADAQ_HD int pyadaq_kvtr_position(int k, int t) {
    const int per_sub = PYADAQ_KVT_GROUP * pyadaq_kvtr_groups<ID>(k);
    const int b = t / per_sub;
    const int r = t - b * per_sub;
    return b * PYADAQ_KVT_QK + pyadaq_kvtr_first_group<ID>(k) * PYADAQ_KVT_GROUP + r;
}

// len (<= 9) bits of the payload from bit `bit` on, little-endian; the read stays in the bytes
// the bits occupy.
PYADAQ_HD int pyadaq_kvtr_bits(const uint8_t * q, int bit, int len) {
    if (len == 0) {
        return 0;
    }
    const int B = bit >> 3;
    const int last = (bit + len - 1) >> 3;
    const uint32_t v = (uint32_t) q[B] | (last > B ? (uint32_t) q[B + 1] << 8 : 0u);
    return (int) ((v >> (bit & 7)) & ((1u << len) - 1));
}

// Value j (0..255) of a row without its scale: the trellis table's entry for its window or the
// Lloyd-Max level of its index (0 for a width of 0). The reference's kvtr_dequantize_row256.
template <int ID>
PYADAQ_HD float pyadaq_kvtr_unscaled(const typename pyadaq_kvt_block<ID>::type * b, int j) {
    static_assert(PYADAQ_KVTR_STATE_BITS + PYADAQ_KVTR_MAX_TRELLIS <= 9 && PYADAQ_KVT_MAX_BITS <= 9, "reads of <= 9 bits");
    const int sub = j / PYADAQ_KVT_QK;
    const int g = (j % PYADAQ_KVT_QK) / PYADAQ_KVT_GROUP;
    const int k = pyadaq_kvt_width<ID>(g);
    if (k == 0) {
        return 0.0f;
    }
    const int t = (sub * pyadaq_kvtr_groups<ID>(k) + g - pyadaq_kvtr_first_group<ID>(k)) * PYADAQ_KVT_GROUP + j % PYADAQ_KVT_GROUP;
    const uint8_t * q = b->q;
    const int start = pyadaq_kvtr_stream_bit<ID>(k);
    const int own = pyadaq_kvtr_bits(q, start + t * k, k);
    if (k > PYADAQ_KVTR_MAX_TRELLIS) {
        return pyadaq_kvt_level(k, own);
    }
    constexpr int S = PYADAQ_KVTR_STATE_BITS;
    const int s0 = t * k - S;
    int state;
    if (s0 >= 0) {
        state = pyadaq_kvtr_bits(q, start + s0, S);
    } else {
        // wraps: the stream's last -s0 bits, then its first t * k
        const int nbits = pyadaq_kvtr_stream_len<ID>(k) * k;
        state = pyadaq_kvtr_bits(q, start + nbits + s0, -s0) | (pyadaq_kvtr_bits(q, start, t * k) << -s0);
    }
    return pyadaq_kvtr_table(k, (own << S) | state);
}

// Values j and j+1 of a row (j even) as floats: d * (table entry or level), the reference's
// product (0 itself for a width of 0).
template <int ID>
PYADAQ_HD void pyadaq_kvtr_dequant2(const typename pyadaq_kvt_block<ID>::type * b, int j, float * v0, float * v1) {
    const float d = pyadaq_kvt_scale(b->e[j / PYADAQ_KVT_QK]);
    const bool zero = pyadaq_kvt_width<ID>((j % PYADAQ_KVT_QK) / PYADAQ_KVT_GROUP) == 0;
    *v0 = zero ? 0.0f : pyadaq_fmul(d, pyadaq_kvtr_unscaled<ID>(b, j));
    *v1 = zero ? 0.0f : pyadaq_fmul(d, pyadaq_kvtr_unscaled<ID>(b, j + 1));
}

// Values i and i+1 (i even) of a row of blocks of any transform-coded type: what flash
// attention's kernels read.
template <int ID>
PYADAQ_HD void pyadaq_kvt_row_dequant2(const void * row, int64_t i, float * v0, float * v1) {
    typedef typename pyadaq_kvt_block<ID>::type block_t;
    constexpr int qk = pyadaq_kvt_qk<ID>();
    const block_t * b = (const block_t *) row + i / qk;
    if constexpr (pyadaq_kvt_is_row<ID>()) {
        pyadaq_kvtr_dequant2<ID>(b, (int) (i % qk), v0, v1);
    } else {
        pyadaq_kvt_dequant2<ID>(b, (int) (i % qk), v0, v1);
    }
}

// ---- the encoder, one warp per row ----------------------------------------------------------------

#if defined(__CUDA_ARCH__)
#    define PYADAQ_WARP_FOR(lane) for (int lane = (int) (threadIdx.x % 32), lane##_once = 1; lane##_once; lane##_once = 0)
#    define PYADAQ_WARP_SYNC()    __syncwarp()
#else
#    define PYADAQ_WARP_FOR(lane) for (int lane = 0; lane < 32; ++lane)
#    define PYADAQ_WARP_SYNC()    ((void) 0)
#endif

// What one warp's encoder keeps between phases (20,772 bytes: shared memory on the GPU).
struct pyadaq_kvtr_scratch {
    float xs[PYADAQ_KVTR_QK];     // the row, non-finite values as 0
    float u[PYADAQ_KVTR_QK];      // x / d per sub-block
    float w[PYADAQ_KVTR_QK];      // d * d
    float err[PYADAQ_KVTR_SUBS][PYADAQ_KVT_SEARCH_N];
    float cost[2][PYADAQ_KVTR_NS];
    uint8_t back[PYADAQ_KVTR_QK][PYADAQ_KVTR_NS];  // per step and state, the r of its best candidate
    uint16_t sym[PYADAQ_KVTR_QK]; // the stream's values: an index, or a window's own k bits
    float rms[PYADAQ_KVTR_SUBS];
    int e[PYADAQ_KVTR_SUBS];
    int end;
};

// One Viterbi pass over width K's stream (the reference's kvtr_viterbi; K a template parameter so
// that the candidate loop unrolls and the table is known): from every state when
// start < 0, else from start alone; leaves the state it reads back from in s->end and, for a
// pass from one state, the values' own bits (the window's high k bits) in s->sym. Called by the whole warp.
template <int ID, int k>
PYADAQ_HD void pyadaq_kvtr_viterbi(pyadaq_kvtr_scratch * s, int start) {
    static_assert(k >= 1 && k <= PYADAQ_KVTR_MAX_TRELLIS, "a trellis width");
    const int n = pyadaq_kvtr_stream_len<ID>(k);
    constexpr int R = 1 << k;
    PYADAQ_WARP_FOR(lane) {
        for (int st = lane; st < PYADAQ_KVTR_NS; st += 32) {
            s->cost[0][st] = (start < 0 || st == start) ? 0.0f : INFINITY;
        }
    }
    PYADAQ_WARP_SYNC();
    for (int t = 0; t < n; ++t) {
        const float * cost = s->cost[t & 1];
        float * next = s->cost[(t + 1) & 1];
        const int j = pyadaq_kvtr_position<ID>(k, t);
        const float ut = s->u[j];
        const float wt = s->w[j];
        PYADAQ_WARP_FOR(lane) {
            for (int s2 = lane; s2 < PYADAQ_KVTR_NS; s2 += 32) {
                float best = INFINITY;
                int br = 0;
                for (int r = 0; r < R; ++r) {  // R a constant: unrolled
                    const int W = (s2 << k) | r;
                    const float diff = pyadaq_fsub(ut, pyadaq_kvtr_table(k, W));
                    const float c = pyadaq_fadd(cost[W & (PYADAQ_KVTR_NS - 1)], pyadaq_fmul(wt, pyadaq_fmul(diff, diff)));
                    if (c < best) {
                        best = c;
                        br = r;
                    }
                }
                next[s2] = best;
                s->back[t][s2] = (uint8_t) br;
            }
        }
        PYADAQ_WARP_SYNC();
    }
    PYADAQ_WARP_FOR(lane) {
        if (lane == 0) {
            // kvtr_end_state: start itself, else the first state of least final cost
            const float * cost = s->cost[n & 1];
            int end = start;
            if (end < 0) {
                end = 0;
                for (int q = 1; q < PYADAQ_KVTR_NS; ++q) {
                    if (cost[q] < cost[end]) {
                        end = q;
                    }
                }
            }
            s->end = end;
            for (int t = n - 1, st = end; start >= 0 && t >= 0; --t) {  // the first pass needs only its end
                const int W = (st << k) | s->back[t][st];  // the window: the state before, then the own bits
                s->sym[t] = (uint16_t) (W >> PYADAQ_KVTR_STATE_BITS);
                st = W & (PYADAQ_KVTR_NS - 1);
            }
        }
    }
    PYADAQ_WARP_SYNC();
}

// The two passes of width k's stream: the first from every state gives the state the second
// starts and ends at.
template <int ID, int k>
PYADAQ_HD void pyadaq_kvtr_trellis(pyadaq_kvtr_scratch * s) {
    pyadaq_kvtr_viterbi<ID, k>(s, -1);
    const int s0 = s->end;
    PYADAQ_WARP_SYNC();  // every lane has read s->end before the next pass writes it
    pyadaq_kvtr_viterbi<ID, k>(s, s0);
}

// Quantizes one row: x[j * stride] for j = 0..255 into y. Called by the whole warp (on the host:
// once, with the lanes run in turn); s is the warp's scratch (not __restrict__: the lanes read
// through it what other lanes wrote before a sync).
template <int ID>
PYADAQ_HD void pyadaq_kvtr_quantize_row(const float * __restrict__ x, int64_t stride, typename pyadaq_kvt_block<ID>::type * __restrict__ y,
                                        pyadaq_kvtr_scratch * s) {
    typedef typename pyadaq_kvt_block<ID>::type block_t;
    constexpr int P = (int) sizeof(block_t) - PYADAQ_KVTR_SUBS;  // payload bytes
    static_assert(sizeof(block_t) == sizeof(((block_t *) nullptr)->e) + sizeof(((block_t *) nullptr)->q), "no padding");

    // the sub-blocks: kvt's scale search, its 16 trials spread over the lanes
    PYADAQ_WARP_FOR(lane) {
        for (int j = lane; j < PYADAQ_KVTR_QK; j += 32) {
            s->xs[j] = x[j * stride];
        }
    }
    PYADAQ_WARP_SYNC();
    PYADAQ_WARP_FOR(lane) {
        if (lane < PYADAQ_KVTR_SUBS) {
            float * xb = s->xs + lane * PYADAQ_KVT_QK;
            s->rms[lane] = pyadaq_kvt_prepare<ID>(xb, xb);  // in place: each value read before it is written
        }
    }
    PYADAQ_WARP_SYNC();
    static_assert(PYADAQ_KVTR_SUBS * PYADAQ_KVT_SEARCH_N == 64, "two trials per lane");
    PYADAQ_WARP_FOR(lane) {
        for (int i = lane; i < PYADAQ_KVTR_SUBS * PYADAQ_KVT_SEARCH_N; i += 32) {
            const int b = i / PYADAQ_KVT_SEARCH_N;
            const int t = i % PYADAQ_KVT_SEARCH_N;
            const float rms = s->rms[b];
            s->err[b][t] = rms > 0.0f ? pyadaq_kvt_trial_error<ID>(s->xs + b * PYADAQ_KVT_QK,
                                                                    pyadaq_kvt_trial_code(pyadaq_kvt_scale_code(rms), t))
                                      : 0.0f;
        }
    }
    PYADAQ_WARP_SYNC();
    PYADAQ_WARP_FOR(lane) {
        if (lane < PYADAQ_KVTR_SUBS) {
            int code = 0;
            if (s->rms[lane] > 0.0f) {
                const int e_rms = pyadaq_kvt_scale_code(s->rms[lane]);
                float best_err = INFINITY;
                code = e_rms;
                for (int t = 0; t < PYADAQ_KVT_SEARCH_N; ++t) {
                    if (s->err[lane][t] < best_err) {
                        best_err = s->err[lane][t];
                        code = pyadaq_kvt_trial_code(e_rms, t);
                    }
                }
            }
            s->e[lane] = code;
            y->e[lane] = (uint8_t) code;
        }
    }
    PYADAQ_WARP_SYNC();
    PYADAQ_WARP_FOR(lane) {
        for (int j = lane; j < PYADAQ_KVTR_QK; j += 32) {
            const float d = pyadaq_kvt_scale(s->e[j / PYADAQ_KVT_QK]);
            const float inv = d > 0.0f ? pyadaq_fdiv(1.0f, d) : 0.0f;
            s->u[j] = pyadaq_fmul(s->xs[j], inv);
            s->w[j] = pyadaq_fmul(d, d);
        }
    }
    PYADAQ_WARP_SYNC();

    // the streams, widest first: the values' symbols, then their bits, a byte per lane at a time
    for (int k = PYADAQ_KVT_MAX_BITS; k >= 1; --k) {
        const int n = pyadaq_kvtr_stream_len<ID>(k);
        if (n == 0) {
            continue;
        }
        if (k > PYADAQ_KVTR_MAX_TRELLIS) {
            PYADAQ_WARP_FOR(lane) {
                for (int t = lane; t < n; t += 32) {
                    s->sym[t] = (uint16_t) pyadaq_kvt_nearest(s->u[pyadaq_kvtr_position<ID>(k, t)], k);
                }
            }
            PYADAQ_WARP_SYNC();
        } else if (k == 1) {
            pyadaq_kvtr_trellis<ID, 1>(s);
        } else if (k == 2) {
            pyadaq_kvtr_trellis<ID, 2>(s);
        } else {
            pyadaq_kvtr_trellis<ID, 3>(s);
        }
        const int first = pyadaq_kvtr_stream_bit<ID>(k) / 8;
        const int bytes = n * k / 8;
        PYADAQ_WARP_FOR(lane) {
            for (int B = lane; B < bytes; B += 32) {
                uint32_t byte = 0;
                for (int i = 0; i < 8; ++i) {
                    const int p = 8 * B + i;
                    byte |= (uint32_t) ((s->sym[p / k] >> (p % k)) & 1) << i;
                }
                y->q[first + B] = (uint8_t) byte;
            }
        }
        PYADAQ_WARP_SYNC();
    }
    static_assert(P > 0, "a payload");
}
