//! The guest's CPU model: KVM's supported CPUID, made per-vCPU (APIC IDs,
//! topology: one socket of N single-thread cores) with features hidden on
//! request (`--cpu-hide`).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPUID feature bit that can be hidden.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

macro_rules! f {
    ($name:literal, $leaf:literal, $sub:literal, $reg:ident, $bit:literal) => {
        Feature {
            name: $name,
            leaf: $leaf,
            subleaf: $sub,
            reg: Reg::$reg,
            bit: $bit,
        }
    };
}

/// Features `--cpu-hide` knows by name (Linux /proc/cpuinfo spelling).
pub const FEATURES: &[Feature] = &[
    f!("sse3", 1, 0, Ecx, 0),
    f!("pclmulqdq", 1, 0, Ecx, 1),
    f!("monitor", 1, 0, Ecx, 3),
    f!("ssse3", 1, 0, Ecx, 9),
    f!("fma", 1, 0, Ecx, 12),
    f!("cx16", 1, 0, Ecx, 13),
    f!("pcid", 1, 0, Ecx, 17),
    f!("sse4_1", 1, 0, Ecx, 19),
    f!("sse4_2", 1, 0, Ecx, 20),
    f!("x2apic", 1, 0, Ecx, 21),
    f!("movbe", 1, 0, Ecx, 22),
    f!("popcnt", 1, 0, Ecx, 23),
    f!("tsc_deadline_timer", 1, 0, Ecx, 24),
    f!("aes", 1, 0, Ecx, 25),
    f!("xsave", 1, 0, Ecx, 26),
    f!("avx", 1, 0, Ecx, 28),
    f!("f16c", 1, 0, Ecx, 29),
    f!("rdrand", 1, 0, Ecx, 30),
    f!("pge", 1, 0, Edx, 13),
    f!("mtrr", 1, 0, Edx, 12),
    f!("pat", 1, 0, Edx, 16),
    f!("clflush", 1, 0, Edx, 19),
    f!("fsgsbase", 7, 0, Ebx, 0),
    f!("bmi1", 7, 0, Ebx, 3),
    f!("avx2", 7, 0, Ebx, 5),
    f!("smep", 7, 0, Ebx, 7),
    f!("bmi2", 7, 0, Ebx, 8),
    f!("erms", 7, 0, Ebx, 9),
    f!("invpcid", 7, 0, Ebx, 10),
    f!("avx512f", 7, 0, Ebx, 16),
    f!("rdseed", 7, 0, Ebx, 18),
    f!("adx", 7, 0, Ebx, 19),
    f!("smap", 7, 0, Ebx, 20),
    f!("clflushopt", 7, 0, Ebx, 23),
    f!("clwb", 7, 0, Ebx, 24),
    f!("sha_ni", 7, 0, Ebx, 29),
    f!("umip", 7, 0, Ecx, 2),
    f!("pku", 7, 0, Ecx, 3),
    f!("vaes", 7, 0, Ecx, 9),
    f!("vpclmulqdq", 7, 0, Ecx, 10),
    f!("la57", 7, 0, Ecx, 16),
    f!("rdpid", 7, 0, Ecx, 22),
    f!("xsaveopt", 0xd, 1, Eax, 0),
    f!("xsavec", 0xd, 1, Eax, 1),
    f!("xgetbv1", 0xd, 1, Eax, 2),
    f!("xsaves", 0xd, 1, Eax, 3),
    f!("lahf_lm", 0x8000_0001, 0, Ecx, 0),
    f!("abm", 0x8000_0001, 0, Ecx, 5),
    f!("sse4a", 0x8000_0001, 0, Ecx, 6),
    f!("3dnowprefetch", 0x8000_0001, 0, Ecx, 8),
    f!("topoext", 0x8000_0001, 0, Ecx, 22),
    f!("nx", 0x8000_0001, 0, Edx, 20),
    f!("pdpe1gb", 0x8000_0001, 0, Edx, 26),
    f!("rdtscp", 0x8000_0001, 0, Edx, 27),
];

/// Features that only work with another one: hiding the key hides these.
const DEPENDENTS: &[(&str, &[&str])] = &[
    (
        "xsave",
        &[
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "xsaveopt",
            "xsavec",
            "xgetbv1",
            "xsaves",
            "vaes",
            "vpclmulqdq",
        ],
    ),
    ("avx", &["avx2", "fma", "f16c", "avx512f", "vaes", "vpclmulqdq"]),
];

/// Errors in the CPU model configuration.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("unknown CPU feature '{0}' in --cpu-hide; known: {1}")]
    UnknownFeature(String, String),
}

/// Resolves `--cpu-hide` names (comma separated) to features, dependents
/// included.
pub fn parse_hidden(list: &[String]) -> Result<Vec<Feature>, CpuidError> {
    let mut names: Vec<&str> = Vec::new();
    for name in list
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let feat = FEATURES.iter().find(|f| f.name == name).ok_or_else(|| {
            CpuidError::UnknownFeature(
                name.to_string(),
                FEATURES.iter().map(|f| f.name).collect::<Vec<_>>().join(","),
            )
        })?;
        names.push(feat.name);
        for (key, deps) in DEPENDENTS {
            if *key == feat.name {
                names.extend_from_slice(deps);
            }
        }
    }
    names.sort_unstable();
    names.dedup();
    Ok(names
        .into_iter()
        .filter_map(|n| FEATURES.iter().find(|f| f.name == n).copied())
        .collect())
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The CPUID of vCPU `index` of `count`.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8, hidden: &[Feature]) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = u32::from(index);
    let n = u32::from(count);
    let core_bits = bits_for(n);
    let xsave_hidden = hidden.iter().any(|f| f.name == "xsave");
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (n.max(1) << 16);
                // Hypervisor present; TSC deadline (in-kernel LAPIC emulates it).
                e.ecx |= (1 << 31) | (1 << 24);
                if n > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            // Deterministic cache parameters (Intel): cores sharing the package.
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((n.max(1) - 1) << 26);
            }
            // No monitor/mwait, thermal or performance monitoring.
            5 | 6 | 0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Extended topology: SMT level (1 thread), core level (n cores).
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = n;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = apic_id;
            }
            0xd if xsave_hidden => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // AMD: number of cores and APIC ID size.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (n.max(1) - 1);
            }
            // AMD extended APIC ID, core and node IDs.
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
        for f in hidden {
            if f.leaf == e.function && f.subleaf == e.index {
                *reg_mut(e, f.reg) &= !(1u32 << f.bit);
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xd, 1), entry(7, 0)]).unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_ids_and_topology_are_per_vcpu() {
        let c = vcpu_cpuid(&sample(), 3, 4, &[]);
        assert_eq!(find(&c, 1, 0).ebx >> 24, 3);
        assert_eq!((find(&c, 1, 0).ebx >> 16) & 0xff, 4);
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).eax, 2);
        assert_eq!(find(&c, 0xb, 0).edx, 3);
    }

    #[test]
    fn hidden_features_and_dependents_are_cleared() {
        let hidden = parse_hidden(&["cx16,xsave".to_string()]).unwrap();
        assert!(hidden.iter().any(|f| f.name == "avx2"));
        let c = vcpu_cpuid(&sample(), 0, 1, &hidden);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ecx & (1 << 13), 0, "cx16");
        assert_eq!(l1.ecx & (1 << 26), 0, "xsave");
        assert_eq!(l1.ecx & (1 << 28), 0, "avx follows xsave");
        assert_ne!(l1.ecx & (1 << 20), 0, "sse4_2 stays");
        assert_eq!(find(&c, 7, 0).ebx & (1 << 5), 0, "avx2 follows xsave");
        assert_eq!(find(&c, 0xd, 1).eax, 0);
    }

    #[test]
    fn unknown_feature_is_an_error() {
        let e = parse_hidden(&["sse9".to_string()]).unwrap_err();
        assert!(e.to_string().contains("sse9"));
    }
}
