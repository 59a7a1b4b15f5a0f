//! Builds the eBPF object from `ebpf/` and leaves it in OUT_DIR for `include_bytes!`, so
//! the `tessera` binary is self-contained.
fn main() -> anyhow::Result<()> {
    // The eBPF target needs `-Z build-std=core`; aya-build passes it when RUSTC_BOOTSTRAP
    // is set, which lets the stable toolchain do it.
    // SAFETY: the build script is single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let root = root.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tessera-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}
