//! x86-64 guest platform: memory layout, boot protocols, vCPU register/CPUID set-up and the ACPI
//! tables that describe the machine to the guest.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
