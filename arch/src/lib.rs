//! x86-64 guest platform: memory layout, boot protocols, vCPU register/CPUID set-up, the ACPI
//! tables and the SMBIOS tables that describe the machine to the guest.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
pub mod smbios;
