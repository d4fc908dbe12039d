//! Rust types for the kubelet Device Plugin API v1beta1, generated at build time from the
//! vendored `proto/deviceplugin/v1beta1/api.proto` (see `build.rs`).

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("v1beta1");

/// The API version the agent speaks.
pub const VERSION: &str = "v1beta1";
/// Health values the kubelet understands.
pub const HEALTHY: &str = "Healthy";
pub const UNHEALTHY: &str = "Unhealthy";
/// Where the kubelet listens for registrations, and where plugins put their sockets.
pub const DEVICE_PLUGIN_PATH: &str = "/var/lib/kubelet/device-plugins";
pub const KUBELET_SOCKET: &str = "kubelet.sock";
