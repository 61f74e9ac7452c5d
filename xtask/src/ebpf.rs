//! The committed eBPF object and the hash of the sources it was built from.
//!
//! `agent-user/ebpf/agentgate.bpf.o` is committed so that a plain stable `cargo build` works on
//! a fresh machine; `agentgate.bpf.o.source-sha256` beside it records which sources produced it.
//! `check` fails when the sources changed without a rebuild, and rebuilds when the toolchain
//! (nightly with rust-src, bpf-linker) is present so the tests run the freshest object.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::sh;

fn root() -> PathBuf {
    agentgate_tests::workspace_root()
}

pub fn object_path() -> PathBuf {
    root().join("agent-user/ebpf/agentgate.bpf.o")
}

fn hash_path() -> PathBuf {
    root().join("agent-user/ebpf/agentgate.bpf.o.source-sha256")
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// SHA-256 over every input of the eBPF build: both crates' manifests and sources and the
/// eBPF crate's lock file, in a fixed order, each as `path NUL contents NUL`.
pub fn source_hash() -> Result<String> {
    let root = root();
    let mut files = vec![
        root.join("agent-ebpf/Cargo.toml"),
        root.join("agent-ebpf/Cargo.lock"),
        root.join("agent-common/Cargo.toml"),
    ];
    collect(&root.join("agent-ebpf/src"), &mut files)?;
    collect(&root.join("agent-common/src"), &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap_or(&f);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(std::fs::read(&f).with_context(|| format!("read {}", f.display()))?);
        h.update([0]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Is the eBPF toolchain here? Returns what is missing.
fn toolchain_missing() -> Option<String> {
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output();
    let Ok(sysroot) = sysroot.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) else {
        return Some("the nightly toolchain".into());
    };
    if sysroot.is_empty() {
        return Some("the nightly toolchain".into());
    }
    if !Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        return Some("nightly's rust-src component".into());
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.map(|o| o.status.success()).unwrap_or(false) {
        return Some("bpf-linker".into());
    }
    None
}

pub fn build() -> Result<()> {
    if let Some(missing) = toolchain_missing() {
        bail!(
            "cannot build the eBPF object: {missing} is missing (see `cargo xtask ebpf-toolchain`)"
        );
    }
    println!("==> building agent-ebpf (nightly, bpfel-unknown-none)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root().join("agent-ebpf")).args([
        "+nightly",
        "build",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
    ]);
    // `cargo xtask` runs under the stable toolchain's cargo, whose environment (CARGO_*,
    // RUSTUP_TOOLCHAIN, LD_LIBRARY_PATH, ...) must not leak into the nightly build: it makes
    // host-only crates build for the BPF target. Start from a clean environment instead.
    cmd.env_clear();
    for key in ["PATH", "HOME", "RUSTUP_HOME", "TERM", "LANG", "USER"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    sh(&mut cmd)?;
    let built = root().join("agent-ebpf/target/bpfel-unknown-none/release/agent-ebpf");
    let fresh = std::fs::read(&built).with_context(|| format!("read {}", built.display()))?;
    let same = std::fs::read(object_path())
        .map(|old| old == fresh)
        .unwrap_or(false);
    std::fs::write(object_path(), &fresh)?;
    std::fs::write(hash_path(), format!("{}\n", source_hash()?))?;
    println!(
        "==> {} {} ({} bytes)",
        object_path().display(),
        if same { "unchanged" } else { "updated" },
        fresh.len()
    );
    Ok(())
}

pub fn check() -> Result<()> {
    let recorded = std::fs::read_to_string(hash_path())
        .with_context(|| format!("read {}", hash_path().display()))?;
    let current = source_hash()?;
    if recorded.trim() != current {
        bail!(
            "the committed eBPF object is stale: agent-ebpf/agent-common sources hash to {current}, the object was built from {}. Run `cargo xtask build-ebpf` and commit agent-user/ebpf/",
            recorded.trim()
        );
    }
    println!(
        "==> committed eBPF object matches its sources ({})",
        &current[..12]
    );
    match toolchain_missing() {
        None => build(),
        Some(missing) => {
            println!(
                "==> eBPF toolchain incomplete ({missing} missing): using the committed object"
            );
            Ok(())
        }
    }
}

/// The recipe from the environment notes: rust-src for nightly, then bpf-linker built against
/// the nightly toolchain's own LLVM through a small prefix directory.
pub fn install_toolchain() -> Result<()> {
    sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .context("nightly's libLLVM.so.* not found")?;
    let prefix = PathBuf::from("/opt/agentgate-bpf-llvm");
    std::fs::create_dir_all(prefix.join("bin"))?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    std::fs::write(prefix.join("bin/llvm-config"), "#!/bin/sh\n")?;
    sh(Command::new("chmod")
        .arg("+x")
        .arg(prefix.join("bin/llvm-config")))?;
    // bpf-linker links against `libLLVM.so` and loads the library by its soname at run time:
    // both names point at nightly's copy.
    let soname = lib.file_name().context("libLLVM file name")?;
    for link in [
        prefix.join("lib/libLLVM.so"),
        prefix.join("lib").join(soname),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    sh(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix))
}
