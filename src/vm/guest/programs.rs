//! The built-in guest programs, as machine code with their assembly listings.
//!
//! Assembled with `nasm -f bin` (not needed to build: the bytes are here, each line with the
//! offset and the instruction it encodes). Register contract, set by the host with
//! `KVM_SET_REGS` (see [`super::Layout::regs`]):
//!
//! | register | meaning |
//! | --- | --- |
//! | `rdi` | first byte of the vCPU's working set (identity-mapped, so GVA = GPA) |
//! | `rsi` | end of the working set (exclusive) |
//! | `rcx` | pages in the working set (random writers) |
//! | `r8` | this vCPU's stats block: `+0` pages written, `+8` pages read, `+16` passes |
//! | `r9` | TSC ticks per page (paced writers) |
//! | `r11` | LCG seed, below `r12 + 1` (random writers) |
//! | `r12` | LCG mask: next power of two of the page count, minus one (random writers) |
//! | `r13` | largest lateness in TSC ticks a paced writer catches up on |
//!
//! Guest code is emulated on hosts without hardware virtualization (a few million
//! instructions per second), so every loop is a handful of instructions per page.

/// Sequential writer, unpaced: `inc byte` on the first byte of every page of
/// `[rdi, rsi)`, bumping `stats.pages_written` per page and `stats.passes` per pass.
/// Five instructions per page.
#[rustfmt::skip]
pub const WRITE: &[u8] = &[
    0x48, 0x89, 0xFB,                       // 00  pass: mov rbx, rdi
    0xFE, 0x03,                             // 03  page: inc byte [rbx]
    0x48, 0x81, 0xC3, 0x00, 0x10, 0x00, 0x00,// 05  add rbx, 4096
    0x49, 0xFF, 0x00,                       // 0c  inc qword [r8]
    0x48, 0x39, 0xF3,                       // 0f  cmp rbx, rsi
    0x72, 0xEF,                             // 12  jb page
    0x49, 0xFF, 0x40, 0x10,                 // 14  inc qword [r8+16]
    0xEB, 0xE6,                             // 18  jmp pass
];

/// Sequential writer paced against the TSC: after each page the deadline moves
/// `r9` ticks on and the guest spins on `rdtsc` until it is reached. A vCPU that falls more
/// than `r13` ticks behind (it was paused or penalized) forgives the debt instead of
/// bursting to catch up.
#[rustfmt::skip]
pub const WRITE_PACED: &[u8] = &[
    0x0F, 0x31,                             // 00  rdtsc
    0x48, 0xC1, 0xE2, 0x20,                 // 02  shl rdx, 32
    0x48, 0x09, 0xD0,                       // 06  or rax, rdx
    0x49, 0x89, 0xC2,                       // 09  mov r10, rax
    0x48, 0x89, 0xFB,                       // 0c  pass: mov rbx, rdi
    0xFE, 0x03,                             // 0f  page: inc byte [rbx]
    0x48, 0x81, 0xC3, 0x00, 0x10, 0x00, 0x00,// 11  add rbx, 4096
    0x49, 0xFF, 0x00,                       // 18  inc qword [r8]
    0x4D, 0x01, 0xCA,                       // 1b  add r10, r9
    0x0F, 0x31,                             // 1e  spin: rdtsc
    0x48, 0xC1, 0xE2, 0x20,                 // 20  shl rdx, 32
    0x48, 0x09, 0xD0,                       // 24  or rax, rdx
    0x4C, 0x39, 0xD0,                       // 27  cmp rax, r10
    0x72, 0xF2,                             // 2a  jb spin
    0x48, 0x89, 0xC2,                       // 2c  mov rdx, rax
    0x4C, 0x29, 0xD2,                       // 2f  sub rdx, r10
    0x4C, 0x39, 0xEA,                       // 32  cmp rdx, r13
    0x76, 0x03,                             // 35  jbe next
    0x49, 0x89, 0xC2,                       // 37  mov r10, rax
    0x48, 0x39, 0xF3,                       // 3a  next: cmp rbx, rsi
    0x72, 0xD0,                             // 3d  jb page
    0x49, 0xFF, 0x40, 0x10,                 // 3f  inc qword [r8+16]
    0xEB, 0xC7,                             // 43  jmp pass
];

/// Pseudo-random writer, unpaced. Page order is a full-period LCG
/// `x = (1103515245 x + 12345) & r12` over the next power of two of the working set
/// (`r12` = that power minus one), drawing again when `x >= rcx` (the page count); every
/// page is written exactly once per period, and the host can replay the order from the seed
/// `r11`. A period ends when the state returns to the seed (`stats.passes`).
#[rustfmt::skip]
pub const RANDOM_WRITE: &[u8] = &[
    0x4C, 0x89, 0xD8,                       // 00  mov rax, r11
    0x48, 0x69, 0xC0, 0x6D, 0x4E, 0xC6, 0x41,// 03  draw: imul rax, rax, 1103515245
    0x48, 0x05, 0x39, 0x30, 0x00, 0x00,     // 0a  add rax, 12345
    0x4C, 0x21, 0xE0,                       // 10  and rax, r12
    0x4C, 0x39, 0xD8,                       // 13  cmp rax, r11
    0x75, 0x04,                             // 16  jne check
    0x49, 0xFF, 0x40, 0x10,                 // 18  inc qword [r8+16]
    0x48, 0x39, 0xC8,                       // 1c  check: cmp rax, rcx
    0x73, 0xE2,                             // 1f  jae draw
    0x48, 0x89, 0xC3,                       // 21  mov rbx, rax
    0x48, 0xC1, 0xE3, 0x0C,                 // 24  shl rbx, 12
    0xFE, 0x04, 0x3B,                       // 28  inc byte [rbx+rdi]
    0x49, 0xFF, 0x00,                       // 2b  inc qword [r8]
    0xEB, 0xD3,                             // 2e  jmp draw
];

/// Pseudo-random writer paced against the TSC: [`RANDOM_WRITE`]'s order with
/// [`WRITE_PACED`]'s pacing (LCG state in `r14`, since `rdtsc` clobbers `rax`).
#[rustfmt::skip]
pub const RANDOM_WRITE_PACED: &[u8] = &[
    0x4D, 0x89, 0xDE,                       // 00  mov r14, r11
    0x0F, 0x31,                             // 03  rdtsc
    0x48, 0xC1, 0xE2, 0x20,                 // 05  shl rdx, 32
    0x48, 0x09, 0xD0,                       // 09  or rax, rdx
    0x49, 0x89, 0xC2,                       // 0c  mov r10, rax
    0x4D, 0x69, 0xF6, 0x6D, 0x4E, 0xC6, 0x41,// 0f  draw: imul r14, r14, 1103515245
    0x49, 0x81, 0xC6, 0x39, 0x30, 0x00, 0x00,// 16  add r14, 12345
    0x4D, 0x21, 0xE6,                       // 1d  and r14, r12
    0x4D, 0x39, 0xDE,                       // 20  cmp r14, r11
    0x75, 0x04,                             // 23  jne check
    0x49, 0xFF, 0x40, 0x10,                 // 25  inc qword [r8+16]
    0x49, 0x39, 0xCE,                       // 29  check: cmp r14, rcx
    0x73, 0xE1,                             // 2c  jae draw
    0x4C, 0x89, 0xF3,                       // 2e  mov rbx, r14
    0x48, 0xC1, 0xE3, 0x0C,                 // 31  shl rbx, 12
    0xFE, 0x04, 0x3B,                       // 35  inc byte [rbx+rdi]
    0x49, 0xFF, 0x00,                       // 38  inc qword [r8]
    0x4D, 0x01, 0xCA,                       // 3b  add r10, r9
    0x0F, 0x31,                             // 3e  spin: rdtsc
    0x48, 0xC1, 0xE2, 0x20,                 // 40  shl rdx, 32
    0x48, 0x09, 0xD0,                       // 44  or rax, rdx
    0x4C, 0x39, 0xD0,                       // 47  cmp rax, r10
    0x72, 0xF2,                             // 4a  jb spin
    0x48, 0x89, 0xC2,                       // 4c  mov rdx, rax
    0x4C, 0x29, 0xD2,                       // 4f  sub rdx, r10
    0x4C, 0x39, 0xEA,                       // 52  cmp rdx, r13
    0x76, 0xB8,                             // 55  jbe draw
    0x49, 0x89, 0xC2,                       // 57  mov r10, rax
    0xEB, 0xB3,                             // 5a  jmp draw
];

/// Sequential reader: loads one word per page of `[rdi, rsi)` and bumps
/// `stats.pages_read`. Never writes guest memory outside the stats page.
#[rustfmt::skip]
pub const READ: &[u8] = &[
    0x48, 0x89, 0xFB,                       // 00  pass: mov rbx, rdi
    0x48, 0x8B, 0x03,                       // 03  page: mov rax, [rbx]
    0x48, 0x81, 0xC3, 0x00, 0x10, 0x00, 0x00,// 06  add rbx, 4096
    0x49, 0xFF, 0x40, 0x08,                 // 0d  inc qword [r8+8]
    0x48, 0x39, 0xF3,                       // 11  cmp rbx, rsi
    0x72, 0xED,                             // 14  jb page
    0x49, 0xFF, 0x40, 0x10,                 // 16  inc qword [r8+16]
    0xEB, 0xE4,                             // 1a  jmp pass
];

/// Idle: `hlt` forever (each `hlt` exits to the host, which parks the vCPU).
#[rustfmt::skip]
pub const IDLE: &[u8] = &[
    0xF4,                                   // 00  halt: hlt
    0xEB, 0xFD,                             // 01  jmp halt
];

/// Countdown: `dec rcx; jnz` until `rcx` is zero, then `hlt`. Two instructions per
/// iteration; `dirtyvm probe` times it to measure the guest's instruction rate.
#[rustfmt::skip]
pub const COUNTDOWN: &[u8] = &[
    0x48, 0xFF, 0xC9,                       // 00  spin: dec rcx
    0x75, 0xFB,                             // 03  jnz spin
    0xF4,                                   // 05  hlt
];
