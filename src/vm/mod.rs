//! The VM: KVM itself ([`kvm`], the only module that issues ioctls or maps kernel memory),
//! the built-in guest ([`guest`]: long-mode setup, workload programs, the stats blocks that
//! are the ground truth), and one thread per vCPU ([`vcpu`]), with the [`handoff`] of
//! penalties and kicks between the threads that control a vCPU and the vCPU itself.
//!
//! Nothing here knows about dirty tracking: a vCPU hands its ring-full exits to whoever
//! implements [`vcpu::RingFullHandler`] (the tracker).

#[cfg(not(loom))]
pub mod guest;
pub mod handoff;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod kvm;
#[cfg(not(loom))]
pub mod vcpu;
