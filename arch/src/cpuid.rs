//! The CPUID table each vCPU sees: what KVM supports, with our topology, APIC IDs and
//! hypervisor leaves filled in.

use hypervisor::CpuIdEntry;

/// `threads_per_core`, `cores_per_die`, `dies_per_package`, `packages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

impl Topology {
    /// All vCPUs as cores of one package, as the original does without `topology=`.
    pub fn flat(vcpus: u8) -> Self {
        Topology {
            threads_per_core: 1,
            cores_per_die: vcpus,
            dies_per_package: 1,
            packages: 1,
        }
    }

    fn per_package(&self) -> u32 {
        u32::from(self.threads_per_core)
            * u32::from(self.cores_per_die)
            * u32::from(self.dies_per_package)
    }
}

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_ADDR_SIZES: u32 = 0x8000_0008;
/// Leaf 1 ECX: Intel VMX.
const ECX_VMX: u32 = 1 << 5;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// Leaf 0x8000_0001 ECX: AMD SVM.
const ECX_SVM: u32 = 1 << 2;
/// AMD's SVM feature leaf.
const LEAF_SVM: u32 = 0x8000_000a;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
const LEVEL_DIE: u32 = 5;

/// Bits needed to number `n` things.
fn width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Guest physical address bits the vCPUs report (CPUID 0x80000008 EAX[7:0]): what the
/// hypervisor supports, capped at `max_phys_bits`. Without the leaf a CPU has 36.
pub fn guest_phys_bits(supported: &[CpuIdEntry], max_phys_bits: u8) -> u8 {
    let host = supported
        .iter()
        .find(|e| e.function == LEAF_ADDR_SIZES)
        .map_or(36, |e| (e.eax & 0xff) as u8);
    host.min(max_phys_bits)
}

/// Patches `supported` for vCPU `cpu_id` (whose APIC ID is `cpu_id`). Without `nested` the
/// guest sees no virtualisation extensions (VMX, SVM and SVM's feature leaf), as the
/// original's `nested=off`.
pub fn vcpu_cpuid(
    supported: &[CpuIdEntry],
    cpu_id: u8,
    topology: Topology,
    max_phys_bits: u8,
    nested: bool,
) -> Vec<CpuIdEntry> {
    let apic_id = u32::from(cpu_id);
    let smt_shift = width(u32::from(topology.threads_per_core));
    let core_shift = smt_shift + width(u32::from(topology.cores_per_die));
    let die_shift = core_shift + width(u32::from(topology.dies_per_package));
    let mut out: Vec<CpuIdEntry> = Vec::with_capacity(supported.len() + 4);
    for e in supported {
        let mut e = *e;
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (apic_id << 24)
                    | (topology.per_package().min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if !nested {
                    e.ecx &= !ECX_VMX;
                }
                if topology.per_package() > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Deterministic cache parameters: cores per package.
            4 => {
                let cores =
                    u32::from(topology.cores_per_die) * u32::from(topology.dies_per_package);
                e.eax = (e.eax & 0x03ff_ffff) | ((cores.clamp(1, 64) - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => continue,
            LEAF_EXT_FEATURES if !nested => e.ecx &= !ECX_SVM,
            LEAF_SVM if !nested => continue,
            LEAF_ADDR_SIZES => {
                e.eax = (e.eax & !0xff) | u32::from(guest_phys_bits(supported, max_phys_bits));
            }
            _ => {}
        }
        out.push(e);
    }
    // Extended topology: SMT and core levels (and die for leaf 0x1f), x2APIC ID in EDX.
    let per_core = u32::from(topology.threads_per_core);
    let per_die = per_core * u32::from(topology.cores_per_die);
    let levels_b = [
        (LEVEL_SMT, smt_shift, per_core),
        (
            LEVEL_CORE,
            die_shift,
            per_die * u32::from(topology.dies_per_package),
        ),
    ];
    let levels_1f = [
        (LEVEL_SMT, smt_shift, per_core),
        (LEVEL_CORE, core_shift, per_die),
        (LEVEL_DIE, die_shift, topology.per_package()),
    ];
    let has = |f: u32| supported.iter().any(|e| e.function == f);
    for (leaf, levels) in [
        (LEAF_EXT_TOPOLOGY, &levels_b[..]),
        (LEAF_V2_EXT_TOPOLOGY, &levels_1f[..]),
    ] {
        if !has(leaf) && leaf == LEAF_V2_EXT_TOPOLOGY {
            continue;
        }
        for (i, &(kind, shift, count)) in levels.iter().chain([(0, 0, 0)].iter()).enumerate() {
            out.push(CpuIdEntry {
                function: leaf,
                index: i as u32,
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: count,
                ecx: (kind << 8) | i as u32,
                edx: apic_id,
                ..Default::default()
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(entries: &[CpuIdEntry], f: u32, i: u32) -> CpuIdEntry {
        *entries
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn apic_ids_topology_and_phys_bits() {
        let supported = vec![
            CpuIdEntry {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            CpuIdEntry {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            CpuIdEntry {
                function: LEAF_ADDR_SIZES,
                eax: 0x3030,
                ..Default::default()
            },
            CpuIdEntry {
                function: LEAF_V2_EXT_TOPOLOGY,
                ..Default::default()
            },
        ];
        let t = Topology {
            threads_per_core: 2,
            cores_per_die: 2,
            dies_per_package: 1,
            packages: 2,
        };
        let c = vcpu_cpuid(&supported, 5, t, 46, true);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 5);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(leaf(&c, LEAF_ADDR_SIZES, 0).eax & 0xff, 46);
        assert_eq!(leaf(&c, LEAF_ADDR_SIZES, 0).eax >> 8, 0x30);
        assert_eq!(guest_phys_bits(&supported, 46), 46);
        assert_eq!(guest_phys_bits(&supported, 52), 48);
        let capped = vcpu_cpuid(&supported, 0, t, 40, true);
        assert_eq!(leaf(&capped, LEAF_ADDR_SIZES, 0).eax & 0xff, 40);
        assert_eq!(guest_phys_bits(&supported[..2], 46), 36);
        let smt = leaf(&c, LEAF_EXT_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (1, 2, 1, 5));
        let core = leaf(&c, LEAF_EXT_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
        assert_eq!(leaf(&c, LEAF_EXT_TOPOLOGY, 2).ecx >> 8, 0);
        assert_eq!(leaf(&c, LEAF_V2_EXT_TOPOLOGY, 2).ecx >> 8, LEVEL_DIE);
        assert_eq!(width(1), 0);
        assert_eq!(width(3), 2);
        assert_eq!(width(4), 2);
    }

    #[test]
    fn nested_off_hides_vmx_and_svm() {
        let supported = vec![
            CpuIdEntry {
                function: 1,
                ecx: ECX_VMX | 1,
                ..Default::default()
            },
            CpuIdEntry {
                function: LEAF_EXT_FEATURES,
                ecx: ECX_SVM | 1,
                ..Default::default()
            },
            CpuIdEntry {
                function: LEAF_SVM,
                eax: 1,
                ..Default::default()
            },
        ];
        let t = Topology::flat(1);
        let on = vcpu_cpuid(&supported, 0, t, 46, true);
        assert_ne!(leaf(&on, 1, 0).ecx & ECX_VMX, 0);
        assert_ne!(leaf(&on, LEAF_EXT_FEATURES, 0).ecx & ECX_SVM, 0);
        assert!(on.iter().any(|e| e.function == LEAF_SVM));
        let off = vcpu_cpuid(&supported, 0, t, 46, false);
        assert_eq!(leaf(&off, 1, 0).ecx & ECX_VMX, 0);
        assert_eq!(leaf(&off, 1, 0).ecx & 1, 1, "other bits stay");
        assert_eq!(leaf(&off, LEAF_EXT_FEATURES, 0).ecx, 1);
        assert!(!off.iter().any(|e| e.function == LEAF_SVM));
    }
}
