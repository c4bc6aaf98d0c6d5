# Which K/V type pairs get a CUDA flash-attention vector kernel: the one source of the list
# for the build (native/cmake/pyadaq_cuda.cmake includes this file) and for the tests.
#
# Sets
#   PYADAQ_CUDA_FA_TYPES            the types whose every K/V pair gets a kernel (a cache entry
#                                   in a build)
#   PYADAQ_CUDA_KVQ_TYPES           pyadaq's types among them (their pairs: pyadaq's instance files)
#   PYADAQ_CUDA_FA_HEAD_SIZES       the head sizes each pair is compiled for
#   PYADAQ_CUDA_UPSTREAM_PAIRS      every "k-v" pair of PYADAQ_CUDA_FA_TYPES without a kvq type
#   PYADAQ_CUDA_KVQ_PAIRS           every "k-v" pair with a kvq type
#   PYADAQ_CUDA_KVT_PAIRS           the pairs with a transform-coded type: the keys' profiles
#                                   (kvt2s, kvt3s, kvt4s) with every V of PYADAQ_CUDA_KVT_V, and
#                                   the keys of PYADAQ_CUDA_KVT_K with the values' profiles
#                                   (kvt1, kvt2, kvt3, kvt4); instance files like the kvq pairs'
#                                   (none with -DPYADAQ_CUDA_KVT=OFF)
#   PYADAQ_CUDA_KVTR_PAIRS          the pairs with a row-trellis value type (kvt2r, kvt3r): the
#                                   keys of PYADAQ_CUDA_KVTR_K with each; compiled for the head
#                                   sizes PYADAQ_CUDA_KVTR_HEAD_SIZES only (a row is 256 values;
#                                   none with -DPYADAQ_CUDA_KVT=OFF)
#   PYADAQ_CUDA_FA_QUANTS_DEFAULT   what pyadaq sets upstream's GGML_CUDA_FA_QUANTS to: the
#                                   upstream pairs plus upstream's default bf16-bf16
# and defines pyadaq_cuda_compiled_pairs(<out> <GGML_CUDA_FA_QUANTS>): every pair with a
# compiled kernel, the list libllama gets as PYADAQ_CUDA_FA_PAIRS for its offload check.
#
# As a script, `cmake [-DGGML_CUDA_FA_QUANTS=...] [-DPYADAQ_CUDA_FA_TYPES=...] -P
# native/cmake/pyadaq_cuda_pairs.cmake` prints on stderr
#   fa_types=<PYADAQ_CUDA_FA_TYPES, comma-separated>
#   compiled=<PYADAQ_CUDA_FA_PAIRS exactly as libllama would get it>
# (GGML_CUDA_FA_QUANTS defaults to PYADAQ_CUDA_FA_QUANTS_DEFAULT), which tests/test_tools.py
# compares with pyadaq.types.CUDA_FA_PAIR_TYPES and CUDA_CACHE_TYPES.

set(_pyadaq_cuda_fa_types "f16;q8_0;q4_0;q4_1;q5_0;q5_1;kvq2;kvq3")
if(CMAKE_SCRIPT_MODE_FILE)
    if(NOT DEFINED PYADAQ_CUDA_FA_TYPES)
        set(PYADAQ_CUDA_FA_TYPES "${_pyadaq_cuda_fa_types}")
    endif()
else()
    set(PYADAQ_CUDA_FA_TYPES "${_pyadaq_cuda_fa_types}" CACHE STRING
        "pyadaq: K/V cache types whose every K/V pair gets a CUDA flash-attention vector kernel")
endif()
set(PYADAQ_CUDA_FA_HEAD_SIZES 64 128 256)
set(PYADAQ_CUDA_KVQ_TYPES kvq2 kvq3)
set(PYADAQ_CUDA_KVT_V f16 q8_0 q4_0 kvq2 kvq3 kvt1 kvt2 kvt3 kvt4)
set(PYADAQ_CUDA_KVT_K f16 q8_0 q4_0)
if(NOT CMAKE_SCRIPT_MODE_FILE)
    option(PYADAQ_CUDA_KVT "pyadaq: compile CUDA flash-attention vector kernels for the kvt pairs" ON)
elseif(NOT DEFINED PYADAQ_CUDA_KVT)
    set(PYADAQ_CUDA_KVT ON)
endif()
set(PYADAQ_CUDA_KVT_PAIRS "")
foreach(_k kvt2s kvt3s kvt4s)
    foreach(_v IN LISTS PYADAQ_CUDA_KVT_V)
        list(APPEND PYADAQ_CUDA_KVT_PAIRS "${_k}-${_v}")
    endforeach()
endforeach()
foreach(_k IN LISTS PYADAQ_CUDA_KVT_K)
    foreach(_v kvt1 kvt2 kvt3 kvt4)
        list(APPEND PYADAQ_CUDA_KVT_PAIRS "${_k}-${_v}")
    endforeach()
endforeach()
set(PYADAQ_CUDA_KVTR_K f16 q8_0 q4_0 kvt2s kvt3s kvt4s)
set(PYADAQ_CUDA_KVTR_HEAD_SIZES 256)
set(PYADAQ_CUDA_KVTR_PAIRS "")
foreach(_k IN LISTS PYADAQ_CUDA_KVTR_K)
    foreach(_v kvt2r kvt3r)
        list(APPEND PYADAQ_CUDA_KVTR_PAIRS "${_k}-${_v}")
    endforeach()
endforeach()
if(NOT PYADAQ_CUDA_KVT)
    set(PYADAQ_CUDA_KVT_PAIRS "")
    set(PYADAQ_CUDA_KVTR_PAIRS "")
endif()

set(PYADAQ_CUDA_UPSTREAM_PAIRS "")
set(PYADAQ_CUDA_KVQ_PAIRS "")
foreach(_k IN LISTS PYADAQ_CUDA_FA_TYPES)
    foreach(_v IN LISTS PYADAQ_CUDA_FA_TYPES)
        if(_k IN_LIST PYADAQ_CUDA_KVQ_TYPES OR _v IN_LIST PYADAQ_CUDA_KVQ_TYPES)
            list(APPEND PYADAQ_CUDA_KVQ_PAIRS "${_k}-${_v}")
        else()
            list(APPEND PYADAQ_CUDA_UPSTREAM_PAIRS "${_k}-${_v}")
        endif()
    endforeach()
endforeach()
set(PYADAQ_CUDA_FA_QUANTS_DEFAULT "${PYADAQ_CUDA_UPSTREAM_PAIRS};bf16-bf16")

# Upstream compiles the pairs of GGML_CUDA_FA_QUANTS ("all": every pair of its quantized types,
# bf16 and f16) and always f16-f16; pyadaq adds its kvq and kvt pairs.
function(pyadaq_cuda_compiled_pairs out quants)
    set(_compiled "")
    foreach(_pair IN LISTS quants)
        string(STRIP "${_pair}" _pair)
        if(_pair STREQUAL "all")
            foreach(_k q4_0 q4_1 q5_0 q5_1 q8_0 bf16 f16)
                foreach(_v q4_0 q4_1 q5_0 q5_1 q8_0 bf16 f16)
                    list(APPEND _compiled "${_k}-${_v}")
                endforeach()
            endforeach()
        elseif(NOT _pair STREQUAL "")
            list(APPEND _compiled "${_pair}")
        endif()
    endforeach()
    list(APPEND _compiled ${PYADAQ_CUDA_KVQ_PAIRS} ${PYADAQ_CUDA_KVT_PAIRS} ${PYADAQ_CUDA_KVTR_PAIRS} "f16-f16")
    list(REMOVE_DUPLICATES _compiled)
    set(${out} "${_compiled}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
    if(NOT DEFINED GGML_CUDA_FA_QUANTS)
        set(GGML_CUDA_FA_QUANTS "${PYADAQ_CUDA_FA_QUANTS_DEFAULT}")
    endif()
    pyadaq_cuda_compiled_pairs(_compiled "${GGML_CUDA_FA_QUANTS}")
    string(REPLACE ";" "," _fa_types "${PYADAQ_CUDA_FA_TYPES}")
    string(REPLACE ";" "," _compiled "${_compiled}")
    message("fa_types=${_fa_types}")
    message("compiled=${_compiled}")
endif()
