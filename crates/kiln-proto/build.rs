//! Compiles Kiln's own protos with a pure-Rust protobuf compiler (protox), so
//! building Kiln needs no `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/google/bytestream/bytestream.proto",
        "proto/kiln/executor/v1/executor.proto",
        "proto/kiln/runner/v1/runner.proto",
        "proto/kiln/cas/v1/batch.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .extern_path(
            ".kiln.cas.v1.Digest",
            "::bazel_remote_apis::build::bazel::remote::execution::v2::Digest",
        )
        .extern_path(
            ".kiln.cas.v1.Status",
            "::bazel_remote_apis::google::rpc::Status",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
