# pyadaq's cache directory, the same rule as pyadaq/_paths.py: $PYADAQ_CACHE_DIR, else
# $XDG_CACHE_HOME/pyadaq, else ~/.cache/pyadaq (an empty variable counts as unset). Sets
# PYADAQ_CACHE_BASE. As a script (cmake -P native/cmake/cache_dir.cmake) it prints the
# directory on stderr, which tests/test_build.py compares with the Python side.
if(NOT "$ENV{PYADAQ_CACHE_DIR}" STREQUAL "")
    set(PYADAQ_CACHE_BASE "$ENV{PYADAQ_CACHE_DIR}")
elseif(NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
    set(PYADAQ_CACHE_BASE "$ENV{XDG_CACHE_HOME}/pyadaq")
else()
    set(PYADAQ_CACHE_BASE "$ENV{HOME}/.cache/pyadaq")
endif()
if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
    message("${PYADAQ_CACHE_BASE}")
endif()
