#ifndef FLOWTRACE_CZYDIS_SHIM_H
#define FLOWTRACE_CZYDIS_SHIM_H
// Zydis 4 from Debian's libzydis-dev (no pkg-config file, hence the plain link line).
#include <Zydis/Zydis.h>
#endif
