/* The protocol test kernels: which protocol a build speaks. */
#ifndef GUEST_KERNEL_H
#define GUEST_KERNEL_H
#define PROTO_MULTIBOOT 1
#define PROTO_MULTIBOOT2 2
#define PROTO_PVH 3
#define PROTO_LINUX 4
#endif
