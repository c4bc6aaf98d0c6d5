// Identifies a libllama as pyadaq's: package version, patch set and upstream pin.
// pyadaq/_native.py compares it with the build info installed next to the library.

#include "pyadaq-quants.h"

PYADAQ_API const char * pyadaq_build_info(void);

const char * pyadaq_build_info(void) {
    return "pyadaq " PYADAQ_VERSION "; patchset " PYADAQ_PATCHSET "; " PYADAQ_UPSTREAM;
}
