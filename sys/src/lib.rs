//! The Linux KVM kernel ABI for dirtyvm, x86-64 only.
//!
//! Hand-written from `include/uapi/linux/kvm.h` and
//! `arch/x86/include/uapi/asm/kvm.h`, and nothing else: no bindgen, no
//! `kvm-bindings`, no `libc` definitions. It holds exactly what dirtyvm uses:
//!
//! - ioctl request numbers ([`KVM_RUN`], [`KVM_RESET_DIRTY_RINGS`], ...) as
//!   literal values, each documented with the fd it applies to and the
//!   capability that makes it available; tests re-derive every number from
//!   `_IOC(dir, KVMIO, nr, size_of::<arg>())`;
//! - capability numbers (`KVM_CAP_*`), exit reasons (`KVM_EXIT_*`) and the
//!   flag constants of the memslot, dirty-ring, dirty-log and `kvm_run` APIs,
//!   plus typed [`bitflags`] wrappers for the flag sets dirtyvm builds;
//! - the `#[repr(C)]` argument structures, with the kernel's spellings and
//!   field order, each followed by compile-time assertions of its size,
//!   alignment and every field offset against the uapi headers.
//!
//! Everything is re-exported flat from the crate root, as in the C headers.
//!
//! The crate is `#![no_std]` and contains no `unsafe` code: it only describes
//! the ABI. Issuing ioctls and mapping `kvm_run` or the dirty rings is the
//! business of the caller.
//!
//! The request numbers are [`core::ffi::c_ulong`], the type glibc's `ioctl`
//! takes; musl takes a `c_int`, so convert at the call site there.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod consts;
mod flags;
mod ioctls;
mod run;
mod structs;

pub use consts::*;
pub use flags::*;
pub use ioctls::*;
pub use run::*;
pub use structs::*;
