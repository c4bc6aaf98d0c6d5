# pyadaq's own C sources, added to upstream's targets so that the patches only need to
# add registrations and call sites.
set(PYADAQ_SRC ${CMAKE_CURRENT_LIST_DIR}/../src)

# Reference kernels and type traits: ggml-base. The reference is the specification that
# pyadaq/quants_ref.py repeats bit for bit, so the compiler must not fuse its multiply-adds.
target_sources(ggml-base PRIVATE ${PYADAQ_SRC}/pyadaq-quants.c ${PYADAQ_SRC}/pyadaq-kvt.c)
target_include_directories(ggml-base PRIVATE ${PYADAQ_SRC})
set_source_files_properties(${PYADAQ_SRC}/pyadaq-quants.c ${PYADAQ_SRC}/pyadaq-kvt.c TARGET_DIRECTORY ggml-base
                            PROPERTIES COMPILE_OPTIONS "-ffp-contract=off")

# CPU paths: ggml-cpu. The AVX2 quantizer repeats the reference's float operations lane by
# lane and must give the same bytes, so it is compiled without contraction too.
target_sources(ggml-cpu PRIVATE ${PYADAQ_SRC}/pyadaq-quants-cpu.c ${PYADAQ_SRC}/pyadaq-fa-cpu.cpp
                               ${PYADAQ_SRC}/pyadaq-tf-cpu.cpp)
set_source_files_properties(${PYADAQ_SRC}/pyadaq-quants-cpu.c TARGET_DIRECTORY ggml-cpu
                            PROPERTIES COMPILE_OPTIONS "-ffp-contract=off")
target_include_directories(ggml-cpu PRIVATE ${PYADAQ_SRC})

# Build identification and llama-level entry points: libllama.
target_sources(llama PRIVATE ${PYADAQ_SRC}/pyadaq-info.c ${PYADAQ_SRC}/pyadaq-llama.cpp
                       ${PYADAQ_SRC}/pyadaq-kv-transform.cpp ${PYADAQ_SRC}/pyadaq-kv-window.cpp
                       ${PYADAQ_SRC}/pyadaq-rpc.cpp)
# nlohmann/json (vendored by llama.cpp) reads plan files (pyadaq_kv_plan_file, PYADAQ_KV_PLAN)
target_include_directories(llama PRIVATE ${PYADAQ_SRC} ${PYADAQ_PATCHED_DIR}/vendor)
# on this one file only, so that a new version or patch set does not rebuild all of libllama
set_source_files_properties(${PYADAQ_SRC}/pyadaq-info.c TARGET_DIRECTORY llama PROPERTIES COMPILE_DEFINITIONS
    "PYADAQ_VERSION=\"${PROJECT_VERSION}\";PYADAQ_PATCHSET=\"${PYADAQ_PATCHSET}\";PYADAQ_UPSTREAM=\"${PYADAQ_UPSTREAM_PACKAGE}==${PYADAQ_UPSTREAM_VERSION}\"")
