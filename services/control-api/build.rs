//! Compiles `proto/flotilla/v1/control_api.proto` with the vendored protoc.
//! Every message it uses from the other `flotilla.v1` files is the
//! `flotilla_proto` crate's own type (one `extern_path` per top-level type
//! of those files), so only the API's own messages and the service are
//! generated here.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let api = here.join("proto/flotilla/v1/control_api.proto");
    let includes = [
        here.join("proto"),
        here.join("../../proto"),
        protoc_bin_vendored::include_path()?,
    ];
    println!("cargo:rerun-if-changed={}", api.display());
    println!(
        "cargo:rerun-if-changed={}",
        here.join("../../proto/flotilla/v1").display()
    );

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let fds = config.load_fds(std::slice::from_ref(&api), &includes)?;
    for file in fds
        .file
        .iter()
        .filter(|f| f.name() != "flotilla/v1/control_api.proto")
    {
        if file.package() != "flotilla.v1" {
            continue;
        }
        let names = file
            .message_type
            .iter()
            .map(|m| m.name())
            .chain(file.enum_type.iter().map(|e| e.name()));
        for name in names {
            config.extern_path(
                format!(".flotilla.v1.{name}"),
                format!("::flotilla_proto::v1::{name}"),
            );
        }
    }
    // What gRPC reflection serves: the API and every file it imports.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("control_api_descriptors.binpb"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
