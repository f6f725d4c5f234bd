/* CKVM: glue between Swift and the /dev/kvm ioctl interface.
 *
 * One function per ioctl the project uses. Each returns the ioctl's
 * non-negative result, or -errno on failure. No logic lives here: every
 * decision is made in the Swift `KVM` target.
 * SAFETY (whole file): declarations only; see ckvm.c. */
#ifndef FLOWTRACE_CKVM_H
#define FLOWTRACE_CKVM_H

#include <linux/kvm.h>
#include <stdint.h>
#include <stddef.h>

/* System ioctls (on the /dev/kvm fd). */
int ckvm_get_api_version(int kvm_fd);
int ckvm_check_extension(int fd, int capability);
int ckvm_create_vm(int kvm_fd);
int ckvm_get_vcpu_mmap_size(int kvm_fd);
int ckvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid2 *cpuid);

/* VM ioctls. */
int ckvm_set_user_memory_region(int vm_fd, const struct kvm_userspace_memory_region *region);
int ckvm_create_vcpu(int vm_fd, unsigned long vcpu_id);
int ckvm_create_irqchip(int vm_fd);
int ckvm_create_pit2(int vm_fd, const struct kvm_pit_config *config);
int ckvm_set_tss_addr(int vm_fd, unsigned long address);
int ckvm_set_identity_map_addr(int vm_fd, const uint64_t *address);
int ckvm_irq_line(int vm_fd, const struct kvm_irq_level *level);

/* vCPU ioctls. */
int ckvm_run(int vcpu_fd);
int ckvm_get_regs(int vcpu_fd, struct kvm_regs *regs);
int ckvm_set_regs(int vcpu_fd, const struct kvm_regs *regs);
int ckvm_get_sregs(int vcpu_fd, struct kvm_sregs *sregs);
int ckvm_set_sregs(int vcpu_fd, const struct kvm_sregs *sregs);
int ckvm_get_fpu(int vcpu_fd, struct kvm_fpu *fpu);
int ckvm_set_fpu(int vcpu_fd, const struct kvm_fpu *fpu);
int ckvm_get_debugregs(int vcpu_fd, struct kvm_debugregs *dregs);
int ckvm_set_debugregs(int vcpu_fd, const struct kvm_debugregs *dregs);
int ckvm_set_guest_debug(int vcpu_fd, const struct kvm_guest_debug *debug);
int ckvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid2 *cpuid);
int ckvm_get_vcpu_events(int vcpu_fd, struct kvm_vcpu_events *events);
int ckvm_set_vcpu_events(int vcpu_fd, const struct kvm_vcpu_events *events);
int ckvm_get_lapic(int vcpu_fd, struct kvm_lapic_state *lapic);
int ckvm_set_lapic(int vcpu_fd, const struct kvm_lapic_state *lapic);
int ckvm_get_mp_state(int vcpu_fd, struct kvm_mp_state *state);
int ckvm_set_mp_state(int vcpu_fd, const struct kvm_mp_state *state);
int ckvm_set_msrs(int vcpu_fd, const struct kvm_msrs *msrs);
int ckvm_translate(int vcpu_fd, struct kvm_translation *t);

/* kvm_run.immediate_exit is written by a kicking thread and cleared by the vCPU thread:
 * an atomic store, which Swift cannot do on a field of a C struct. */
void ckvm_store_immediate_exit(struct kvm_run *run, uint8_t value);

/* Macro values Swift cannot import (function-like or shifted), as constants. */
extern const uint64_t ckvm_sync_x86_regs;
extern const uint64_t ckvm_sync_x86_sregs;
extern const uint64_t ckvm_sync_x86_events;
extern const uint32_t ckvm_guestdbg_enable;
extern const uint32_t ckvm_guestdbg_singlestep;
extern const uint32_t ckvm_guestdbg_use_sw_bp;
extern const uint32_t ckvm_guestdbg_use_hw_bp;
extern const uint32_t ckvm_guestdbg_inject_bp;
extern const uint32_t ckvm_guestdbg_blockirq;
extern const uint32_t ckvm_guestdbg_inject_db;
extern const uint32_t ckvm_pit_speaker_dummy;

#endif
