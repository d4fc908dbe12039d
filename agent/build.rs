//! Compiles the vendored kubelet APIs with `protox` (a protobuf compiler written in Rust), so
//! building the agent never needs a system `protoc`: the Device Plugin API (the agent serves it and
//! the registration client) and the pod-resources API (the agent is only its client).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device_plugin = "proto/deviceplugin/v1beta1/api.proto";
    let pod_resources = "proto/podresources/v1/api.proto";
    for proto in [device_plugin, pod_resources] {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile([device_plugin], ["proto"])?)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(protox::compile([pod_resources], ["proto"])?)?;
    Ok(())
}
