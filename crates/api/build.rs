//! Generates the PunchrService messages and service from `proto/punchr.proto`, with protox (a
//! protobuf compiler in Rust, so no `protoc` is needed).

fn main() {
    println!("cargo:rerun-if-changed=proto/punchr.proto");
    let fds = match protox::compile(["proto/punchr.proto"], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("proto/punchr.proto: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure().compile_fds(fds) {
        panic!("generating the PunchrService code: {e}");
    }
}
