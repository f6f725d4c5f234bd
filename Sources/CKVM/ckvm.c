/* CKVM: one function per ioctl; see include/ckvm.h. ioctl is variadic, which
 * Swift cannot call, hence this file.
 * SAFETY (whole file): each function passes its caller's pointer straight to one ioctl
 * whose argument type it names; the Swift KVM target owns every buffer and keeps it alive
 * for the call, and the struct sizes it relies on are pinned below. */
#define _GNU_SOURCE
#include "ckvm.h"

#include <errno.h>
#include <sys/ioctl.h>

/* The Swift side lays these out itself (MemoryLayout); pin the sizes it relies on. */
_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs layout changed");
_Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs layout changed");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2 layout changed");
_Static_assert(sizeof(struct kvm_guest_debug) == 72, "kvm_guest_debug layout changed");
_Static_assert(sizeof(struct kvm_lapic_state) == 1024, "kvm_lapic_state layout changed");
_Static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry layout changed");

static int result(int r) { return r < 0 ? -errno : r; }

int ckvm_get_api_version(int kvm_fd) { return result(ioctl(kvm_fd, KVM_GET_API_VERSION, 0)); }
int ckvm_check_extension(int fd, int capability) { return result(ioctl(fd, KVM_CHECK_EXTENSION, capability)); }
int ckvm_create_vm(int kvm_fd) { return result(ioctl(kvm_fd, KVM_CREATE_VM, 0)); }
int ckvm_get_vcpu_mmap_size(int kvm_fd) { return result(ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)); }
int ckvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid2 *cpuid) { return result(ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid)); }

int ckvm_set_user_memory_region(int vm_fd, const struct kvm_userspace_memory_region *region) { return result(ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, region)); }
int ckvm_create_vcpu(int vm_fd, unsigned long vcpu_id) { return result(ioctl(vm_fd, KVM_CREATE_VCPU, vcpu_id)); }

int ckvm_create_irqchip(int vm_fd) { return result(ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)); }
int ckvm_create_pit2(int vm_fd, const struct kvm_pit_config *config) { return result(ioctl(vm_fd, KVM_CREATE_PIT2, config)); }
int ckvm_set_tss_addr(int vm_fd, unsigned long address) { return result(ioctl(vm_fd, KVM_SET_TSS_ADDR, address)); }
int ckvm_set_identity_map_addr(int vm_fd, const uint64_t *address) { return result(ioctl(vm_fd, KVM_SET_IDENTITY_MAP_ADDR, address)); }
int ckvm_irq_line(int vm_fd, const struct kvm_irq_level *level) { return result(ioctl(vm_fd, KVM_IRQ_LINE, level)); }

int ckvm_run(int vcpu_fd) { return result(ioctl(vcpu_fd, KVM_RUN, 0)); }
int ckvm_get_regs(int vcpu_fd, struct kvm_regs *regs) { return result(ioctl(vcpu_fd, KVM_GET_REGS, regs)); }
int ckvm_set_regs(int vcpu_fd, const struct kvm_regs *regs) { return result(ioctl(vcpu_fd, KVM_SET_REGS, regs)); }
int ckvm_get_sregs(int vcpu_fd, struct kvm_sregs *sregs) { return result(ioctl(vcpu_fd, KVM_GET_SREGS, sregs)); }
int ckvm_set_sregs(int vcpu_fd, const struct kvm_sregs *sregs) { return result(ioctl(vcpu_fd, KVM_SET_SREGS, sregs)); }
int ckvm_get_fpu(int vcpu_fd, struct kvm_fpu *fpu) { return result(ioctl(vcpu_fd, KVM_GET_FPU, fpu)); }
int ckvm_set_fpu(int vcpu_fd, const struct kvm_fpu *fpu) { return result(ioctl(vcpu_fd, KVM_SET_FPU, fpu)); }
int ckvm_get_debugregs(int vcpu_fd, struct kvm_debugregs *dregs) { return result(ioctl(vcpu_fd, KVM_GET_DEBUGREGS, dregs)); }
int ckvm_set_debugregs(int vcpu_fd, const struct kvm_debugregs *dregs) { return result(ioctl(vcpu_fd, KVM_SET_DEBUGREGS, dregs)); }
int ckvm_set_guest_debug(int vcpu_fd, const struct kvm_guest_debug *debug) { return result(ioctl(vcpu_fd, KVM_SET_GUEST_DEBUG, debug)); }
int ckvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid2 *cpuid) { return result(ioctl(vcpu_fd, KVM_SET_CPUID2, cpuid)); }
int ckvm_get_vcpu_events(int vcpu_fd, struct kvm_vcpu_events *events) { return result(ioctl(vcpu_fd, KVM_GET_VCPU_EVENTS, events)); }
int ckvm_set_vcpu_events(int vcpu_fd, const struct kvm_vcpu_events *events) { return result(ioctl(vcpu_fd, KVM_SET_VCPU_EVENTS, events)); }

int ckvm_get_lapic(int vcpu_fd, struct kvm_lapic_state *lapic) { return result(ioctl(vcpu_fd, KVM_GET_LAPIC, lapic)); }
int ckvm_set_lapic(int vcpu_fd, const struct kvm_lapic_state *lapic) { return result(ioctl(vcpu_fd, KVM_SET_LAPIC, lapic)); }
int ckvm_get_mp_state(int vcpu_fd, struct kvm_mp_state *state) { return result(ioctl(vcpu_fd, KVM_GET_MP_STATE, state)); }
int ckvm_set_mp_state(int vcpu_fd, const struct kvm_mp_state *state) { return result(ioctl(vcpu_fd, KVM_SET_MP_STATE, state)); }
int ckvm_set_msrs(int vcpu_fd, const struct kvm_msrs *msrs) { return result(ioctl(vcpu_fd, KVM_SET_MSRS, msrs)); }
int ckvm_translate(int vcpu_fd, struct kvm_translation *t) { return result(ioctl(vcpu_fd, KVM_TRANSLATE, t)); }

void ckvm_store_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

const uint64_t ckvm_sync_x86_regs = KVM_SYNC_X86_REGS;
const uint64_t ckvm_sync_x86_sregs = KVM_SYNC_X86_SREGS;
const uint64_t ckvm_sync_x86_events = KVM_SYNC_X86_EVENTS;
const uint32_t ckvm_guestdbg_enable = KVM_GUESTDBG_ENABLE;
const uint32_t ckvm_guestdbg_singlestep = KVM_GUESTDBG_SINGLESTEP;
const uint32_t ckvm_guestdbg_use_sw_bp = KVM_GUESTDBG_USE_SW_BP;
const uint32_t ckvm_guestdbg_use_hw_bp = KVM_GUESTDBG_USE_HW_BP;
const uint32_t ckvm_guestdbg_inject_bp = KVM_GUESTDBG_INJECT_BP;
const uint32_t ckvm_guestdbg_blockirq = KVM_GUESTDBG_BLOCKIRQ;
const uint32_t ckvm_guestdbg_inject_db = KVM_GUESTDBG_INJECT_DB;
const uint32_t ckvm_pit_speaker_dummy = KVM_PIT_SPEAKER_DUMMY;
