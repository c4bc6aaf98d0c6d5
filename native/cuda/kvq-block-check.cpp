// Host build of the CUDA kernels' block arithmetic (pyadaq-kvq-block.h), for tests/test_cuda_block.py:
//
//     kvq-block-check BITS IN.f32 OUT
//
// reads float32 values (a whole number of 32-value blocks) and writes, using only the
// functions the CUDA kernels call:
//     OUT.q    the blocks pyadaq_kvq_quantize_block writes (SET_ROWS, CPY f32 -> kvq)
//     OUT.deq  float32 values from pyadaq_kvq_dequant2 (GET_ROWS, CPY kvq -> f32, f16 conversion)
//     OUT.lev  per 4 values, the int32 of packed int8 levels from pyadaq_kvq_get_levels4
//              (flash attention's K.Q dp4a operand and V dequantization)
//     OUT.f16  each input converted by pyadaq_f32_to_f16
//
//     kvq-block-check TYPE_ID IN.f32 OUT     (a transform-coded type, pyadaq-kvt-block.h)
//
// writes OUT.q (pyadaq_kvt_quantize_block), OUT.deq (pyadaq_kvt_dequant2) and OUT.lev (float32
// levels without the scale, pyadaq_kvt_unscaled: flash attention's K.Q and V operands) for a
// whole number of 64-value blocks; for a row-trellis type (pyadaq-kvtr-block.h) the same from
// pyadaq_kvtr_quantize_row (the warp's program, its lanes run in turn), pyadaq_kvt_row_dequant2 and
// pyadaq_kvtr_unscaled, for a whole number of 256-value rows, and exits 1 if a row read with a
// stride of 2 (CPY's strided source) gives other bytes.
// Compile with -ffp-contract=off, as the reference is.

#include "pyadaq-kvq-block.h"
#include "pyadaq-kvt-block.h"
#include "pyadaq-kvtr-block.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <string>
#include <vector>

template <typename T>
static bool write_all(const char * path, const std::vector<T> & v) {
    FILE * f = std::fopen(path, "wb");
    if (!f) {
        return false;
    }
    const bool ok = std::fwrite(v.data(), sizeof(T), v.size(), f) == v.size();
    return std::fclose(f) == 0 && ok;
}

template <int BITS>
static int run(const std::vector<float> & x, const std::string & out) {
    typedef typename pyadaq_kvq_block<BITS>::type block_t;
    const size_t nb = x.size() / PYADAQ_KVQ_QK;
    std::vector<block_t> q(nb);
    std::vector<float> deq(x.size());
    std::vector<int32_t> lev(x.size() / 4);
    std::vector<uint16_t> h(x.size());
    for (size_t b = 0; b < nb; ++b) {
        pyadaq_kvq_quantize_block<BITS>(x.data() + b * PYADAQ_KVQ_QK, &q[b]);
        for (int j = 0; j < PYADAQ_KVQ_QK; j += 2) {
            pyadaq_kvq_dequant2<BITS>(&q[b], j, &deq[b * PYADAQ_KVQ_QK + j], &deq[b * PYADAQ_KVQ_QK + j + 1]);
        }
        for (int j0 = 0; j0 < PYADAQ_KVQ_QK; j0 += 4) {
            lev[(b * PYADAQ_KVQ_QK + j0) / 4] = pyadaq_kvq_get_levels4<BITS>(&q[b], j0);
        }
    }
    for (size_t i = 0; i < x.size(); ++i) {
        h[i] = pyadaq_f32_to_f16(x[i]);
    }
    if (!write_all((out + ".q").c_str(), q) || !write_all((out + ".deq").c_str(), deq) ||
        !write_all((out + ".lev").c_str(), lev) || !write_all((out + ".f16").c_str(), h)) {
        std::fprintf(stderr, "cannot write %s.*\n", out.c_str());
        return 1;
    }
    return 0;
}

template <int ID>
static int run_kvt(const std::vector<float> & x, const std::string & out) {
    typedef typename pyadaq_kvt_block<ID>::type block_t;
    constexpr int qk = pyadaq_kvt_qk<ID>();
    const size_t nb = x.size() / qk;
    std::vector<block_t> q(nb);
    std::vector<float> deq(x.size());
    std::vector<float> lev(x.size());
    pyadaq_kvtr_scratch scratch;
    std::vector<float> strided(2 * qk);
    for (size_t b = 0; b < nb; ++b) {
        if constexpr (pyadaq_kvt_is_row<ID>()) {
            pyadaq_kvtr_quantize_row<ID>(x.data() + b * qk, 1, &q[b], &scratch);
            // CPY's strided source: the same row every other float, NaN between, the same bytes
            for (int j = 0; j < qk; ++j) {
                strided[2 * j] = x[b * qk + j];
                strided[2 * j + 1] = NAN;
            }
            block_t again;
            pyadaq_kvtr_quantize_row<ID>(strided.data(), 2, &again, &scratch);
            if (std::memcmp(&again, &q[b], sizeof(block_t)) != 0) {
                std::fprintf(stderr, "row %zu: the strided source gave other bytes\n", b);
                return 1;
            }
        } else {
            pyadaq_kvt_quantize_block<ID>(x.data() + b * qk, &q[b]);
        }
    }
    for (size_t i = 0; i < x.size(); i += 2) {
        pyadaq_kvt_row_dequant2<ID>(q.data(), (int64_t) i, &deq[i], &deq[i + 1]);
    }
    for (size_t b = 0; b < nb; ++b) {
        for (int j = 0; j < qk; ++j) {
            if constexpr (pyadaq_kvt_is_row<ID>()) {
                lev[b * qk + j] = pyadaq_kvtr_unscaled<ID>(&q[b], j);
            } else {
                lev[b * qk + j] = pyadaq_kvt_unscaled<ID>(&q[b], j);
            }
        }
    }
    if (!write_all((out + ".q").c_str(), q) || !write_all((out + ".deq").c_str(), deq) ||
        !write_all((out + ".lev").c_str(), lev)) {
        std::fprintf(stderr, "cannot write %s.*\n", out.c_str());
        return 1;
    }
    return 0;
}

static bool is_kvt(int id) {
#define PYADAQ_KVT_IS(UPPER, lower, tid, ...) if (id == (tid)) return true;
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_IS)
#undef PYADAQ_KVT_IS
    return false;
}

int main(int argc, char ** argv) {
    const int mode = argc == 4 ? std::atoi(argv[1]) : 0;
    if (mode != 2 && mode != 3 && !is_kvt(mode)) {
        std::fprintf(stderr, "usage: %s 2|3|KVT_TYPE_ID IN.f32 OUT\n", argv[0]);
        return 2;
    }
    FILE * f = std::fopen(argv[2], "rb");
    if (!f) {
        std::fprintf(stderr, "cannot read %s\n", argv[2]);
        return 1;
    }
    std::vector<float> x;
    float buf[4096];
    size_t n;
    while ((n = std::fread(buf, sizeof(float), 4096, f)) > 0) {
        x.insert(x.end(), buf, buf + n);
    }
    std::fclose(f);
#define PYADAQ_KVT_RUN(UPPER, lower, tid, ...)                                                              \
    if (mode == (tid)) {                                                                                    \
        if (x.size() % pyadaq_kvt_qk<tid>() != 0) {                                                         \
            std::fprintf(stderr, "%zu values: not a whole number of %d-value blocks\n", x.size(), pyadaq_kvt_qk<tid>()); \
            return 1;                                                                                       \
        }                                                                                                   \
        return run_kvt<tid>(x, argv[3]);                                                                    \
    }
    PYADAQ_KVT_ALL_TYPES(PYADAQ_KVT_RUN)
#undef PYADAQ_KVT_RUN
    if (x.size() % PYADAQ_KVQ_QK != 0) {
        std::fprintf(stderr, "%zu values: not a whole number of %d-value blocks\n", x.size(), PYADAQ_KVQ_QK);
        return 1;
    }
    return std::atoi(argv[1]) == 2 ? run<2>(x, argv[3]) : run<3>(x, argv[3]);
}
