#![allow(dead_code)]

pub mod agent;
pub mod fake_apiserver;
pub mod otlp;
pub mod process;
pub mod targets;
