//! The Kubernetes client for discovery: in-cluster from the service-account directory,
//! from `KUBECONFIG` (several files merged as kubectl does), or none (standalone).
//!
//! kube's own retry layer is off: discovery owns the one backoff, so a refused request is
//! never retried behind its back. A thin layer below kube's client notes what the apiserver
//! answered on each resource path (`Retry-After`, an accepted watch), which kube's errors and
//! its watcher do not pass on.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::{bracket, Config, ConfigError};
use crate::sync::lock;

/// A client, the namespace the agent runs in, and what the apiserver answered lately.
pub struct Kube {
    pub client: kube::Client,
    pub namespace: String,
    pub answers: ApiAnswers,
}

/// Builds the client, or `None` when there is no Kubernetes configuration at all.
pub async fn build(config: &Config) -> Result<Option<Kube>, ConfigError> {
    let (mut kube_config, variable, value) = if let Some(paths) = &config.kubeconfig {
        let value = paths.display().to_string();
        (from_kubeconfig(paths).await?, "KUBECONFIG", value)
    } else if let Some(host) = &config.kubernetes_service_host {
        (in_cluster(config, host)?, "KUBERNETES_SERVICE_HOST", host.clone())
    } else {
        return Ok(None);
    };
    kube_config.default_retry = false;
    let namespace = kube_config.default_namespace.clone();
    let answers = ApiAnswers::default();
    let client = kube::client::ClientBuilder::try_from(kube_config)
        .map_err(|e| ConfigError::new(variable, value, e.to_string()))?
        .with_layer(&answers)
        .build();
    Ok(Some(Kube { client, namespace, answers }))
}

/// `KUBECONFIG` as kubectl reads it: a list of files separated by `:`, merged in order (the
/// first to set a value wins); files that do not exist are skipped, unless none does.
async fn from_kubeconfig(paths: &Path) -> Result<kube::Config, ConfigError> {
    let value = paths.display().to_string();
    let bad = |problem: String| ConfigError::new("KUBECONFIG", value.clone(), problem);
    let listed: Vec<PathBuf> = std::env::split_paths(paths).filter(|p| !p.as_os_str().is_empty()).collect();
    let existing: Vec<&PathBuf> = listed.iter().filter(|p| p.exists()).collect();
    if existing.is_empty() {
        return Err(bad(match listed.len() {
            1 => "no such file".to_owned(),
            _ => "none of these files exists".to_owned(),
        }));
    }
    let mut merged = kube::config::Kubeconfig::default();
    for path in existing {
        let file = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        merged = merged.merge(file).map_err(|e| bad(format!("cannot merge {}: {e}", path.display())))?;
    }
    // kube falls back to `HTTPS_PROXY` from the environment when the kubeconfig names no proxy;
    // the agent's settings come from its configuration only, and it talks to the apiserver
    // directly. A `proxy-url` in the kubeconfig itself is kept (and refused by the client,
    // which is built without proxy support, with a clear error).
    let names_a_proxy = merged.clusters.iter().any(|c| c.cluster.as_ref().is_some_and(|c| c.proxy_url.is_some()));
    let mut config = kube::Config::from_custom_kubeconfig(merged, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    if !names_a_proxy {
        config.proxy_url = None;
    }
    Ok(config)
}

/// The in-cluster configuration; the token and the CA are checked here so that a broken
/// service-account mount is named at start rather than failing every request.
fn in_cluster(config: &Config, host: &str) -> Result<kube::Config, ConfigError> {
    let url = format!("https://{}:{}", bracket(host), config.kubernetes_service_port);
    let url: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ConfigError::new("KUBERNETES_SERVICE_HOST", host, e.to_string()))?;
    let dir = &config.service_account_dir;
    let bad = |problem: String| ConfigError::new("KUBENURSE_SERVICE_ACCOUNT_DIR", dir.display().to_string(), problem);
    let token = dir.join("token");
    match std::fs::read_to_string(&token) {
        Ok(t) if t.trim().is_empty() => {
            return Err(bad(format!("the service-account token {} is empty", token.display())))
        }
        Ok(_) => {}
        Err(e) => return Err(bad(format!("cannot read the service-account token {}: {e}", token.display()))),
    }
    let ca = dir.join("ca.crt");
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(&ca).and_then(Iterator::collect);
    match certs {
        Ok(certs) if certs.is_empty() => {
            return Err(bad(format!("the service-account CA {} holds no certificate", ca.display())))
        }
        Ok(_) => {}
        Err(e) => return Err(bad(format!("cannot read the service-account CA {}: {e}", ca.display()))),
    }
    let mut c = kube::Config::new(url);
    // Both files are re-read by the client, so rotated tokens and CAs are picked up.
    c.root_cert_file = Some(ca);
    c.auth_info.token_file = Some(token.to_string_lossy().into_owned());
    c.connect_timeout = Some(Duration::from_secs(10));
    c.default_namespace = std::fs::read_to_string(dir.join("namespace"))
        .map(|ns| ns.trim().to_owned())
        .ok()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    Ok(c)
}

/// What the apiserver last answered on each resource path (e.g. `/api/v1/nodes`), recorded
/// below kube's client.
#[derive(Clone, Debug, Default)]
pub struct ApiAnswers(Arc<Mutex<HashMap<String, PathAnswers>>>);

#[derive(Clone, Copy, Debug, Default)]
struct PathAnswers {
    retry_after: Option<Duration>,
    watch_accepted: Option<Instant>,
}

impl ApiAnswers {
    /// The `Retry-After` of the latest refused request on `path`, once.
    pub fn take_retry_after(&self, path: &str) -> Option<Duration> {
        lock(&self.0).get_mut(path).and_then(|a| a.retry_after.take())
    }

    /// When the apiserver last accepted a watch on `path` (answered it with 2xx).
    pub fn watch_accepted(&self, path: &str) -> Option<Instant> {
        lock(&self.0).get(path).and_then(|a| a.watch_accepted)
    }

    fn record(&self, path: &str, watch: bool, status: http::StatusCode, headers: &http::HeaderMap) {
        let retry_after = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut answers = lock(&self.0);
        let entry = answers.entry(path.to_owned()).or_default();
        if status.is_success() {
            if watch {
                entry.watch_accepted = Some(Instant::now());
            }
        } else if retry_after.is_some() {
            entry.retry_after = retry_after;
        }
    }
}

impl<S> tower::Layer<S> for ApiAnswers {
    type Service = Answered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Answered { inner, answers: self.clone() }
    }
}

/// The service [`ApiAnswers`] wraps around kube's stack.
#[derive(Clone)]
pub struct Answered<S> {
    inner: S,
    answers: ApiAnswers,
}

type Answer<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, B> tower::Service<Request<kube::client::Body>> for Answered<S>
where
    S: tower::Service<Request<kube::client::Body>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Answer<B, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let watch = request.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let answers = self.answers.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            answers.record(&path, watch, response.status(), response.headers());
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_keep_retry_after_once_and_accepted_watches() {
        let answers = ApiAnswers::default();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("3"));
        answers.record("/api/v1/nodes", false, http::StatusCode::TOO_MANY_REQUESTS, &headers);
        assert_eq!(answers.take_retry_after("/api/v1/nodes"), Some(Duration::from_secs(3)));
        assert_eq!(answers.take_retry_after("/api/v1/nodes"), None, "taken once");
        assert_eq!(answers.take_retry_after("/api/v1/pods"), None);

        assert_eq!(answers.watch_accepted("/api/v1/nodes"), None);
        answers.record("/api/v1/nodes", false, http::StatusCode::OK, &http::HeaderMap::new());
        assert_eq!(answers.watch_accepted("/api/v1/nodes"), None, "a list is not a watch");
        answers.record("/api/v1/nodes", true, http::StatusCode::OK, &http::HeaderMap::new());
        assert!(answers.watch_accepted("/api/v1/nodes").is_some());
    }
}
