#ifndef FLOWTRACE_CCOMPRESSION_SHIM_H
#define FLOWTRACE_CCOMPRESSION_SHIM_H
// The decompressors a Linux bzImage's payload may need, from Debian's zlib1g-dev, liblzma-dev,
// libzstd-dev, liblz4-dev and libbz2-dev.
#include <zlib.h>
#include <lzma.h>
#include <zstd.h>
#include <lz4.h>
#include <bzlib.h>
#endif
