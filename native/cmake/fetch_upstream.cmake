# Find the pinned llama.cpp source and set PYADAQ_UPSTREAM_SOURCE_DIR.
#
# Order: PYADAQ_LLAMA_CPP_DIR (CMake variable or environment variable) names a llama.cpp
# tree for offline builds and patch work; otherwise the pinned llama-cpp-python sdist is
# taken from PYADAQ_SDIST (a file), or from the download cache, or downloaded from PyPI
# with pip, and checked against the sha256 in native/UPSTREAM.cmake.
#
# Works in a configure step (include()) and as a script (cmake -P, used by dev-tree.sh).

include(${CMAKE_CURRENT_LIST_DIR}/../UPSTREAM.cmake)

if(NOT DEFINED PYADAQ_WORK_DIR)
    set(PYADAQ_WORK_DIR "${CMAKE_BINARY_DIR}/_upstream")
endif()
if(NOT DEFINED PYADAQ_LLAMA_CPP_DIR AND DEFINED ENV{PYADAQ_LLAMA_CPP_DIR})
    set(PYADAQ_LLAMA_CPP_DIR "$ENV{PYADAQ_LLAMA_CPP_DIR}")
endif()
if(NOT DEFINED PYADAQ_SDIST AND DEFINED ENV{PYADAQ_SDIST})
    set(PYADAQ_SDIST "$ENV{PYADAQ_SDIST}")
endif()

function(pyadaq_fail what)
    message(FATAL_ERROR
        "pyadaq: ${what}\n"
        "pyadaq builds llama.cpp from the pinned ${PYADAQ_UPSTREAM_PACKAGE}==${PYADAQ_UPSTREAM_VERSION} sdist "
        "(sha256 ${PYADAQ_UPSTREAM_SHA256}). Do one of:\n"
        "  - build with network access to PyPI (the sdist is downloaded once and cached in ${_cache_dir});\n"
        "  - download it elsewhere with `pip download --no-deps --no-binary ${PYADAQ_UPSTREAM_PACKAGE} "
        "${PYADAQ_UPSTREAM_PACKAGE}==${PYADAQ_UPSTREAM_VERSION}` and put ${PYADAQ_UPSTREAM_SDIST} in ${_cache_dir}, "
        "or point PYADAQ_SDIST at it;\n"
        "  - set PYADAQ_LLAMA_CPP_DIR to a llama.cpp source tree of that version (its vendor/llama.cpp).")
endfunction()

include(${CMAKE_CURRENT_LIST_DIR}/cache_dir.cmake)
set(_cache_dir "${PYADAQ_CACHE_BASE}")

if(PYADAQ_LLAMA_CPP_DIR)
    get_filename_component(_dir "${PYADAQ_LLAMA_CPP_DIR}" ABSOLUTE)
    if(NOT EXISTS "${_dir}/ggml/include/ggml.h" OR NOT EXISTS "${_dir}/include/llama.h")
        pyadaq_fail("PYADAQ_LLAMA_CPP_DIR=${_dir} is not a llama.cpp source tree (no ggml/include/ggml.h or include/llama.h).")
    endif()
    set(PYADAQ_UPSTREAM_SOURCE_DIR "${_dir}")
    set(PYADAQ_UPSTREAM_ID "dir:${_dir}")
else()
    set(_sdist "${_cache_dir}/${PYADAQ_UPSTREAM_SDIST}")
    if(PYADAQ_SDIST)
        set(_sdist "${PYADAQ_SDIST}")
    endif()
    if(EXISTS "${_sdist}")
        file(SHA256 "${_sdist}" _sha)
        if(NOT _sha STREQUAL PYADAQ_UPSTREAM_SHA256)
            if(PYADAQ_SDIST)
                pyadaq_fail("${_sdist} has sha256 ${_sha}, not the pinned one.")
            endif()
            message(STATUS "pyadaq: cached ${_sdist} has the wrong sha256; downloading it again")
            file(REMOVE "${_sdist}")
        endif()
    endif()
    if(NOT EXISTS "${_sdist}")
        if(NOT Python_EXECUTABLE)
            find_program(Python_EXECUTABLE NAMES python3 python)
        endif()
        set(_dl "${PYADAQ_WORK_DIR}/download")
        file(REMOVE_RECURSE "${_dl}")
        message(STATUS "pyadaq: downloading ${PYADAQ_UPSTREAM_PACKAGE}==${PYADAQ_UPSTREAM_VERSION} (sdist) with pip")
        execute_process(
            COMMAND "${Python_EXECUTABLE}" -m pip download --no-deps --no-build-isolation
                    --no-binary ${PYADAQ_UPSTREAM_PACKAGE} -d "${_dl}"
                    "${PYADAQ_UPSTREAM_PACKAGE}==${PYADAQ_UPSTREAM_VERSION}"
            RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
        if(NOT _rc EQUAL 0 OR NOT EXISTS "${_dl}/${PYADAQ_UPSTREAM_SDIST}")
            pyadaq_fail("downloading the sdist with pip failed (${_rc}):\n${_out}\n${_err}")
        endif()
        file(SHA256 "${_dl}/${PYADAQ_UPSTREAM_SDIST}" _sha)
        if(NOT _sha STREQUAL PYADAQ_UPSTREAM_SHA256)
            pyadaq_fail("the downloaded sdist has sha256 ${_sha}, not the pinned one; refusing to build from it.")
        endif()
        file(MAKE_DIRECTORY "${_cache_dir}")
        file(COPY_FILE "${_dl}/${PYADAQ_UPSTREAM_SDIST}" "${_sdist}")
        file(REMOVE_RECURSE "${_dl}")
    endif()
    set(_extract "${PYADAQ_WORK_DIR}/sdist-${PYADAQ_UPSTREAM_VERSION}")
    set(_root "${_extract}/llama_cpp_python-${PYADAQ_UPSTREAM_VERSION}")
    if(NOT EXISTS "${_extract}/.complete")
        file(REMOVE_RECURSE "${_extract}")
        message(STATUS "pyadaq: extracting ${_sdist}")
        file(ARCHIVE_EXTRACT INPUT "${_sdist}" DESTINATION "${_extract}")
        file(TOUCH "${_extract}/.complete")
    endif()
    set(PYADAQ_UPSTREAM_SOURCE_DIR "${_root}/${PYADAQ_UPSTREAM_SUBDIR}")
    set(PYADAQ_UPSTREAM_ID "sdist:${PYADAQ_UPSTREAM_SHA256}")
endif()

message(STATUS "pyadaq upstream source: ${PYADAQ_UPSTREAM_SOURCE_DIR}")
