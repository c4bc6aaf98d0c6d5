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
# a changed patch re-runs the configure step (and so the patching) in an existing build tree
if(NOT CMAKE_SCRIPT_MODE_FILE)
    set_property(DIRECTORY "${CMAKE_SOURCE_DIR}" APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${PYADAQ_PATCHES})
endif()
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

# Files the current patches touch (the "+++ b/<path>" lines).
set(_touched "")
foreach(_p IN LISTS PYADAQ_PATCHES)
    file(STRINGS "${_p}" _lines REGEX "^\\+\\+\\+ b/")
    foreach(_l IN LISTS _lines)
        string(REGEX REPLACE "^\\+\\+\\+ b/" "" _f "${_l}")
        list(APPEND _touched "${_f}")
    endforeach()
endforeach()
list(REMOVE_DUPLICATES _touched)

set(_stamp "${PYADAQ_PATCHED_DIR}/.pyadaq-source")
set(_stamp_patches "${PYADAQ_PATCHED_DIR}/.pyadaq-patchset")
unset(_staging)
set(_have "")
# Every patch of this set is in already (the patch-set stamp is written only once all applied):
# nothing to apply. Checking each patch in reverse is not enough on its own, because patches
# that touch neighbouring lines of a file do not reverse-apply one without the other.
set(_all_in FALSE)
if(EXISTS "${_stamp}")
    file(READ "${_stamp}" _have)
endif()
if(NOT _have STREQUAL PYADAQ_UPSTREAM_ID OR NOT EXISTS "${_stamp_patches}")
    message(STATUS "pyadaq: copying ${PYADAQ_UPSTREAM_SOURCE_DIR} to ${PYADAQ_PATCHED_DIR}")
    file(REMOVE_RECURSE "${PYADAQ_PATCHED_DIR}")
    file(COPY "${PYADAQ_UPSTREAM_SOURCE_DIR}/" DESTINATION "${PYADAQ_PATCHED_DIR}"
         PATTERN ".git" EXCLUDE)
    file(WRITE "${_stamp}" "${PYADAQ_UPSTREAM_ID}")
else()
    # Same upstream, other patches: the new set is applied to pristine copies of every file the
    # old or the new patches touch, in a staging tree beside the patched one; then only the files
    # whose contents change are copied over (and touched, so that the build sees them change).
    # A file that ends up as it was keeps its time stamp: changing one patch does not rebuild
    # everything that includes a header another patch touches.
    file(READ "${_stamp_patches}" _old)
    string(REGEX MATCH "^[^\n]*" _old_id "${_old}")
    if(_old_id STREQUAL PYADAQ_PATCHSET)
        set(_all_in TRUE)
    else()
        string(REGEX REPLACE "^[^\n]*\n" "" _old_files "${_old}")
        string(REPLACE "\n" ";" _old_files "${_old_files}")
        set(_restore ${_touched} ${_old_files})
        list(REMOVE_DUPLICATES _restore)
        set(_staging "${PYADAQ_PATCHED_DIR}.pyadaq-staging")
        file(REMOVE_RECURSE "${_staging}")
        file(MAKE_DIRECTORY "${_staging}")
        foreach(_f IN LISTS _restore)
            if(_f AND EXISTS "${PYADAQ_UPSTREAM_SOURCE_DIR}/${_f}")
                get_filename_component(_d "${_staging}/${_f}" DIRECTORY)
                file(MAKE_DIRECTORY "${_d}")
                file(COPY_FILE "${PYADAQ_UPSTREAM_SOURCE_DIR}/${_f}" "${_staging}/${_f}")
            endif()
        endforeach()
        message(STATUS "pyadaq: patch set changed (${_old_id} -> ${PYADAQ_PATCHSET}); applying it to the patched files")
    endif()
endif()

find_program(PYADAQ_GIT git)
if(NOT PYADAQ_GIT)
    message(FATAL_ERROR "pyadaq: git is needed to apply native/patches (git apply); please install git")
endif()
if(_all_in)
    set(PYADAQ_PATCHES_TO_APPLY "")
else()
    set(PYADAQ_PATCHES_TO_APPLY ${PYADAQ_PATCHES})
endif()
get_filename_component(_ceiling "${PYADAQ_PATCHED_DIR}" DIRECTORY)
set(_apply_dir "${PYADAQ_PATCHED_DIR}")
if(_staging)
    set(_apply_dir "${_staging}")
endif()
foreach(_p IN LISTS PYADAQ_PATCHES_TO_APPLY)
    get_filename_component(_name "${_p}" NAME)
    # GIT_CEILING_DIRECTORIES keeps git from taking an enclosing repository for this tree's.
    set(_git ${CMAKE_COMMAND} -E env "GIT_CEILING_DIRECTORIES=${_ceiling}" ${PYADAQ_GIT} apply)
    execute_process(COMMAND ${_git} --check --reverse "${_p}" WORKING_DIRECTORY "${_apply_dir}"
                    RESULT_VARIABLE _applied OUTPUT_QUIET ERROR_QUIET)
    if(_applied EQUAL 0)
        continue()
    endif()
    execute_process(COMMAND ${_git} "${_p}" WORKING_DIRECTORY "${_apply_dir}"
                    RESULT_VARIABLE _rc ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
        message(FATAL_ERROR
            "pyadaq: patch ${_name} does not apply to ${PYADAQ_UPSTREAM_SOURCE_DIR}:\n${_err}\n"
            "Regenerate the patch against the pinned version (${PYADAQ_UPSTREAM_PACKAGE}==${PYADAQ_UPSTREAM_VERSION}): "
            "native/scripts/dev-tree.sh DIR, fix and commit there, then native/scripts/regenerate-patches.sh DIR.")
    endif()
    message(STATUS "pyadaq: applied ${_name}")
endforeach()

if(_staging)
    set(_n_changed 0)
    foreach(_f IN LISTS _restore)
        if(NOT _f OR NOT EXISTS "${_staging}/${_f}")
            continue()
        endif()
        set(_same FALSE)
        if(EXISTS "${PYADAQ_PATCHED_DIR}/${_f}")
            file(SHA256 "${_staging}/${_f}" _h_new)
            file(SHA256 "${PYADAQ_PATCHED_DIR}/${_f}" _h_old)
            if(_h_new STREQUAL _h_old)
                set(_same TRUE)
            endif()
        endif()
        if(NOT _same)
            get_filename_component(_d "${PYADAQ_PATCHED_DIR}/${_f}" DIRECTORY)
            file(MAKE_DIRECTORY "${_d}")
            file(COPY_FILE "${_staging}/${_f}" "${PYADAQ_PATCHED_DIR}/${_f}")
            file(TOUCH "${PYADAQ_PATCHED_DIR}/${_f}")
            math(EXPR _n_changed "${_n_changed} + 1")
        endif()
    endforeach()
    file(REMOVE_RECURSE "${_staging}")
    message(STATUS "pyadaq: ${_n_changed} patched file(s) changed")
endif()

# Recorded only once every patch is in, so that a failed run is redone from clean files.
string(REPLACE ";" "\n" _touched_lines "${_touched}")
file(WRITE "${_stamp_patches}" "${PYADAQ_PATCHSET}\n${_touched_lines}")
