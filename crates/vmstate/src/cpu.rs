//! Can this host run a vCPU saved elsewhere? Every feature bit the saved
//! vCPU was shown must be one this host's CPU has, and the vendor must
//! match.
//!
//! The reference is the host's own CPUID instruction, not
//! KVM_GET_SUPPORTED_CPUID: some KVMs (this machine's kvm_pvm) report a
//! vCPU's CPUID wider than their supported list, since the guest runs
//! directly on the host CPU.

use kvm_bindings::kvm_cpuid_entry2;

use crate::StateError;

/// (leaf, subleaf, register index 0=eax..3=edx, what) of feature words.
const FEATURE_WORDS: &[(u32, u32, usize, &str)] = &[
    (1, 0, 2, "CPUID.1:ECX"),
    (1, 0, 3, "CPUID.1:EDX"),
    (7, 0, 1, "CPUID.7.0:EBX"),
    (7, 0, 2, "CPUID.7.0:ECX"),
    (7, 0, 3, "CPUID.7.0:EDX"),
    (0xd, 1, 0, "CPUID.0xD.1:EAX"),
    (0x8000_0001, 0, 2, "CPUID.0x80000001:ECX"),
    (0x8000_0001, 0, 3, "CPUID.0x80000001:EDX"),
];

/// Bits that KVM reports per vCPU or that the VMM sets itself (hypervisor
/// bit, OSXSAVE/OSPKE follow guest CR4, APIC ID fields are not features).
fn ignored(leaf: u32, reg: usize) -> u32 {
    match (leaf, reg) {
        (1, 2) => (1 << 31) | (1 << 27) | (1 << 24), // hypervisor, OSXSAVE, TSC-deadline (emulated)
        (7, 2) => 1 << 4,                            // OSPKE
        (1, 3) => 1 << 28,                           // HTT: topology, set by the VMM
        _ => 0,
    }
}

fn word(e: &kvm_cpuid_entry2, reg: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][reg]
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| e.function == leaf && e.index == sub)
}

/// The host CPU's vendor and feature leaves, as CPUID entries.
pub fn host_cpuid() -> Vec<kvm_cpuid_entry2> {
    use std::arch::x86_64::__cpuid_count;
    let mut leaves: Vec<(u32, u32)> = vec![(0, 0)];
    leaves.extend(FEATURE_WORDS.iter().map(|w| (w.0, w.1)));
    leaves.dedup();
    leaves
        .into_iter()
        .map(|(function, index)| {
            // CPUID is available on every x86_64 CPU and has no side effects.
            let r = __cpuid_count(function, index);
            kvm_cpuid_entry2 {
                function,
                index,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
                ..Default::default()
            }
        })
        .collect()
}

/// Checks `saved` against the `host` entries (see [`host_cpuid`]); the
/// error names what is missing.
pub fn check_compatible(saved: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Result<(), StateError> {
    let vendor = |e: Option<&kvm_cpuid_entry2>| e.map(|e| (e.ebx, e.edx, e.ecx));
    if vendor(find(saved, 0, 0)) != vendor(find(host, 0, 0)) {
        return Err(StateError::IncompatibleCpu("the saved CPU vendor".into()));
    }
    let mut missing = Vec::new();
    for &(leaf, sub, reg, name) in FEATURE_WORDS {
        let want = find(saved, leaf, sub).map(|e| word(e, reg)).unwrap_or(0) & !ignored(leaf, reg);
        let have = find(host, leaf, sub).map(|e| word(e, reg)).unwrap_or(0);
        let lacking = want & !have;
        if lacking != 0 {
            missing.push(format!("{name} bits {lacking:#x}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StateError::IncompatibleCpu(missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn subset_is_compatible_superset_is_not() {
        let host = [e(0, 0, 1, 2, 3), e(1, 0, 0, 0b1011, 0xff)];
        assert!(check_compatible(&[e(0, 0, 1, 2, 3), e(1, 0, 0, 0b0011 | (1 << 31), 0x0f)], &host).is_ok());
        let err = check_compatible(&[e(0, 0, 1, 2, 3), e(1, 0, 0, 0b0111, 0)], &host).unwrap_err();
        assert!(err.to_string().contains("CPUID.1:ECX bits 0x4"), "{err}");
        let err = check_compatible(&[e(0, 0, 9, 2, 3)], &host).unwrap_err();
        assert!(err.to_string().contains("vendor"));
    }

    #[test]
    fn host_is_compatible_with_itself() {
        let host = host_cpuid();
        assert!(host.iter().any(|e| e.function == 1 && e.edx != 0));
        check_compatible(&host, &host).unwrap();
    }
}
