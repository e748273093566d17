//! Compiles `proto/*.proto` into Rust with protox (a protobuf compiler in Rust: no system
//! `protoc`) and tonic-prost-build, and writes the list of the node API's methods
//! (`api_methods.rs`) so that the role table can be checked against the .proto.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/machine.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;

    let mut methods = String::from(
        "/// Every method of the node API as its gRPC path, generated from the .proto.\n\
         pub const API_METHODS: &[&str] = &[\n",
    );
    for file in &fds.file {
        for service in &file.service {
            for method in &service.method {
                writeln!(
                    methods,
                    "    \"/{}.{}/{}\",",
                    file.package(),
                    service.name(),
                    method.name()
                )?;
            }
        }
    }
    methods.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("api_methods.rs"), methods)?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
