//! Compiles bpf/racc.bpf.c into a BPF object with clang (Debian's clang-14
//! by default; `REMORA_CLANG` names another). The object is embedded in the
//! crate; libbpf relocates it against the running kernel's BTF when loaded.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/racc.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=bpf/racc_kernel.h");
    println!("cargo:rerun-if-env-changed=REMORA_CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("racc.bpf.o");
    let candidates: Vec<String> = match std::env::var("REMORA_CLANG") {
        Ok(c) => vec![c],
        Err(_) => vec!["clang-14".into(), "clang".into()],
    };
    let arch_inc = format!(
        "-I/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
    );
    for clang in &candidates {
        let status = Command::new(clang)
            .args([
                "-g",
                "-O2",
                "-target",
                "bpf",
                "-Wall",
                "-Werror",
                "-D__TARGET_ARCH_x86",
                &arch_inc,
                "-c",
                src,
                "-o",
            ])
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => return,
            Ok(s) => panic!("{clang} failed to compile {src} ({s})"),
            Err(_) => continue,
        }
    }
    panic!(
        "remora-racc needs clang to compile its BPF program ({src}); tried {candidates:?}. \
         Install Debian's clang-14 and libbpf-dev (scripts/deps.sh does), or set REMORA_CLANG."
    );
}
