//! Compiles Kiln's own protos with a pure-Rust protobuf compiler (protox), so
//! building Kiln needs no `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/google/bytestream/bytestream.proto",
        "proto/kiln/executor/v1/executor.proto",
        "proto/kiln/runner/v1/runner.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
