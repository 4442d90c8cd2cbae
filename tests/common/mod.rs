#![allow(dead_code)]

pub mod agent;
pub mod dns;
pub mod fake_apiserver;
pub mod otlp;
pub mod process;
pub mod secret;
pub mod targets;
