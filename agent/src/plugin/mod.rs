pub mod api;
pub mod config;
pub mod resources;
pub mod server;
