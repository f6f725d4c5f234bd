#ifndef FLOWTRACE_CLIBELF_SHIM_H
#define FLOWTRACE_CLIBELF_SHIM_H
#include <libelf.h>
#include <gelf.h>
#endif
