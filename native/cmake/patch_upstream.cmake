# Copy the upstream source into the build tree (a user's tree is never modified) and apply
# native/patches/*.patch idempotently: a patch that is already applied is skipped, one that
# does not apply stops the build.

# In a configure step the patched tree is <build>/llama.cpp; as a script (cmake -P, used by the
# tests) the caller names PYADAQ_UPSTREAM_SOURCE_DIR, PYADAQ_UPSTREAM_ID and PYADAQ_PATCHED_DIR.
if(NOT DEFINED PYADAQ_PATCHED_DIR)
    set(PYADAQ_PATCHED_DIR "${CMAKE_BINARY_DIR}/llama.cpp")
endif()
include(${CMAKE_CURRENT_LIST_DIR}/../UPSTREAM.cmake)
file(GLOB PYADAQ_PATCHES "${CMAKE_CURRENT_LIST_DIR}/../patches/*.patch")
list(SORT PYADAQ_PATCHES)

# The patch set id: a hash of the patches, in order. It is compiled into libllama and
# written into the package, and pyadaq checks at import that the two agree.
set(_ids "")
foreach(_p IN LISTS PYADAQ_PATCHES)
    file(SHA256 "${_p}" _h)
    string(APPEND _ids "${_h}")
endforeach()
string(SHA256 _h "${_ids}")
string(SUBSTRING "${_h}" 0 16 PYADAQ_PATCHSET)

set(_stamp "${PYADAQ_PATCHED_DIR}/.pyadaq-source")
set(_want "${PYADAQ_UPSTREAM_ID}")
set(_have "")
if(EXISTS "${_stamp}")
    file(READ "${_stamp}" _have)
endif()
if(NOT _have STREQUAL _want)
    message(STATUS "pyadaq: copying ${PYADAQ_UPSTREAM_SOURCE_DIR} to ${PYADAQ_PATCHED_DIR}")
    file(REMOVE_RECURSE "${PYADAQ_PATCHED_DIR}")
    file(COPY "${PYADAQ_UPSTREAM_SOURCE_DIR}/" DESTINATION "${PYADAQ_PATCHED_DIR}"
         PATTERN ".git" EXCLUDE)
    file(WRITE "${_stamp}" "${_want}")
endif()

find_program(PYADAQ_GIT git)
if(NOT PYADAQ_GIT)
    message(FATAL_ERROR "pyadaq: git is needed to apply native/patches (git apply); please install git")
endif()
get_filename_component(_ceiling "${PYADAQ_PATCHED_DIR}" DIRECTORY)
foreach(_p IN LISTS PYADAQ_PATCHES)
    get_filename_component(_name "${_p}" NAME)
    # GIT_CEILING_DIRECTORIES keeps git from taking an enclosing repository for this tree's.
    set(_git ${CMAKE_COMMAND} -E env "GIT_CEILING_DIRECTORIES=${_ceiling}" ${PYADAQ_GIT} apply)
    execute_process(COMMAND ${_git} --check --reverse "${_p}" WORKING_DIRECTORY "${PYADAQ_PATCHED_DIR}"
                    RESULT_VARIABLE _applied OUTPUT_QUIET ERROR_QUIET)
    if(_applied EQUAL 0)
        continue()
    endif()
    execute_process(COMMAND ${_git} "${_p}" WORKING_DIRECTORY "${PYADAQ_PATCHED_DIR}"
                    RESULT_VARIABLE _rc ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
        message(FATAL_ERROR
            "pyadaq: patch ${_name} does not apply to ${PYADAQ_UPSTREAM_SOURCE_DIR}:\n${_err}\n"
            "Regenerate the patch against the pinned version (${PYADAQ_UPSTREAM_PACKAGE}==${PYADAQ_UPSTREAM_VERSION}): "
            "native/scripts/dev-tree.sh DIR, fix and commit there, then native/scripts/regenerate-patches.sh DIR.")
    endif()
    message(STATUS "pyadaq: applied ${_name}")
endforeach()
