#!/usr/bin/env bash
# Installs what remora's build, demo, tests and benchmarks need on Debian 12
# (run as root). Safe to run again: it only installs what is missing.
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have cc || need_pkgs+=(gcc libc6-dev)
have objdump || need_pkgs+=(binutils)
have qemu-system-x86_64 || need_pkgs+=(qemu-system-x86)
have ip || need_pkgs+=(iproute2)
have unshare || need_pkgs+=(util-linux)
have setpriv || need_pkgs+=(util-linux)
have dpkg-deb || need_pkgs+=(dpkg)
have curl || need_pkgs+=(curl ca-certificates)
# The fence's etcd client is generated from etcd's protobufs at build time;
# the fence tests run real etcd servers (and etcdctl to find the leader).
have protoc || need_pkgs+=(protobuf-compiler)
have etcd || need_pkgs+=(etcd-server)
have etcdctl || need_pkgs+=(etcd-client)
# RACC's BPF program is compiled with clang at build time (crates/racc);
# libbpf-sys builds libbpf from source against libelf and zlib.
have clang-14 || need_pkgs+=(clang-14)
[ -e /usr/include/bpf/bpf_helpers.h ] || need_pkgs+=(libbpf-dev)
[ -e /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
[ -e /usr/include/zlib.h ] || need_pkgs+=(zlib1g-dev)
have pkg-config || need_pkgs+=(pkg-config)
# The HTTP tests and benchmark: a real server and load generator.
have nginx || need_pkgs+=(nginx-light)
have wrk || need_pkgs+=(wrk)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "remora: installing ${need_pkgs[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# apt-get download (used by the Linux tests) needs package lists.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
    apt-get update -qq
fi

if ! have cargo && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! have cargo; then
    echo "remora: installing the Rust toolchain (rustup, stable)" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "remora: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi

# matplotlib_python: sets $py to a python3 that can import matplotlib (for
# the plots), installing Debian's python3-matplotlib if none can: Debian's
# python3 (a python3 earlier in PATH, e.g. pyenv's, may lack it).
matplotlib_python() {
    py=python3
    if ! "$py" -c 'import matplotlib' >/dev/null 2>&1; then
        py=/usr/bin/python3
        if ! "$py" -c 'import matplotlib' >/dev/null 2>&1; then
            echo "remora: installing python3-matplotlib" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib >/dev/null
        fi
    fi
}
