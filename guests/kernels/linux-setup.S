/* The first 1024 bytes of the Linux-protocol test kernel as a bzImage: a boot sector whose
 * setup header ("HdrS", protocol 2.15, 64-bit entry) says where the protected-mode code
 * is, and one setup sector. Field offsets from Linux's Documentation/arch/x86/boot.rst. */
    .code16
    .section .text
    .org 0x1F1
    .byte 1                 /* setup_sects */
    .word 0                 /* root_flags */
    .long 0                 /* syssize */
    .word 0                 /* ram_size */
    .word 0xFFFF            /* vid_mode */
    .word 0                 /* root_dev */
    .word 0xAA55            /* boot_flag (0x1FE) */
    .byte 0xEB, 0x66        /* jump (0x200): the header ends at 0x268 */
    .ascii "HdrS"           /* header (0x202) */
    .word 0x020F            /* version 2.15 */
    .long 0                 /* realmode_swtch */
    .word 0                 /* start_sys_seg */
    .word 0                 /* kernel_version */
    .byte 0                 /* type_of_loader (0x210) */
    .byte 0x01              /* loadflags: LOADED_HIGH */
    .word 0                 /* setup_move_size */
    .long 0x100000          /* code32_start (0x214) */
    .long 0                 /* ramdisk_image */
    .long 0                 /* ramdisk_size */
    .long 0                 /* bootsect_kludge */
    .word 0                 /* heap_end_ptr */
    .byte 0                 /* ext_loader_ver */
    .byte 0                 /* ext_loader_type */
    .long 0                 /* cmd_line_ptr (0x228) */
    .long 0x7FFFFFFF        /* initrd_addr_max (0x22C) */
    .long 0x200000          /* kernel_alignment */
    .byte 0                 /* relocatable_kernel */
    .byte 0                 /* min_alignment */
    .word 0x0001            /* xloadflags (0x236): XLF_KERNEL_64 */
    .long 2047              /* cmdline_size (0x238) */
    .long 0                 /* hardware_subarch */
    .quad 0                 /* hardware_subarch_data */
    .long 0                 /* payload_offset */
    .long 0                 /* payload_length */
    .quad 0                 /* setup_data */
    .quad 0x100000          /* pref_address (0x258) */
    .long 0x400000          /* init_size (0x260): 4 MiB */
    .long 0                 /* handover_offset */
    .long 0                 /* kernel_info_offset */
    .org 1024
