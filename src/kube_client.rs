//! The Kubernetes client for discovery: in-cluster from the service-account directory,
//! from an explicitly named kubeconfig, or none (standalone).

use std::time::Duration;

use crate::config::{bracket, Config, ConfigError};

/// A client and the namespace the agent runs in.
pub struct Kube {
    pub client: kube::Client,
    pub namespace: String,
}

/// Builds the client, or `None` when there is no Kubernetes configuration at all.
pub async fn build(config: &Config) -> Result<Option<Kube>, ConfigError> {
    let kube_config = if let Some(path) = &config.kubeconfig {
        let bad = |e: &dyn std::fmt::Display| ConfigError::new("KUBECONFIG", path.display().to_string(), e.to_string());
        let file = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(&e))?;
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| bad(&e))?
    } else if let Some(host) = &config.kubernetes_service_host {
        let url = format!("https://{}:{}", bracket(host), config.kubernetes_service_port);
        let url: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| {
            ConfigError::new("KUBERNETES_SERVICE_HOST", host.clone(), e.to_string())
        })?;
        let dir = &config.service_account_dir;
        let mut c = kube::Config::new(url);
        // Both files are re-read by the client, so rotated tokens and CAs are picked up.
        c.root_cert_file = Some(dir.join("ca.crt"));
        c.auth_info.token_file = Some(dir.join("token").to_string_lossy().into_owned());
        c.connect_timeout = Some(Duration::from_secs(10));
        c.default_namespace = std::fs::read_to_string(dir.join("namespace"))
            .map(|ns| ns.trim().to_owned())
            .unwrap_or_else(|_| "default".to_owned());
        c
    } else {
        return Ok(None);
    };
    let namespace = kube_config.default_namespace.clone();
    let client = kube::Client::try_from(kube_config).map_err(|e| {
        ConfigError::new(
            "KUBERNETES_SERVICE_HOST",
            config.kubernetes_service_host.clone().unwrap_or_default(),
            e.to_string(),
        )
    })?;
    Ok(Some(Kube { client, namespace }))
}
