//! One watch loop for every resource discovery follows. kube's watcher lists once, then
//! watches and re-lists only when the watch expires; this loop drives it so that a failure
//! waits out one backoff before the next attempt, shows in the state, is logged once per
//! streak, and counts as over only when a list completes or a re-established watch has
//! stayed open for a while. (kube's watcher announces every list attempt with `Init`, and a
//! watch that comes back after an error with no change in the cluster says nothing at all;
//! neither is a sign of health.)
//!
//! The first list is a streaming list (a watch with `sendInitialEvents`: the apiserver sends
//! the objects from its watch cache, without a LIST) where the apiserver serves them. One that
//! refuses them answers 422 (Kubernetes 1.27 to 1.33 with the `WatchList` feature gate off,
//! as in a default 1.33), and kube's watcher would then send the same request forever: this
//! loop switches to paginated lists instead, for every watch of the agent, and says so once.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::Api;
use serde::de::DeserializeOwned;

use super::backoff::Backoff;
use super::{Collection, Discovery, Store};
use crate::error_text::chain;
use crate::kube_client::ApiAnswers;
use crate::ratelimit::FailureStreak;

/// At most one reminder line per this long while a watch keeps failing.
const REMIND_EVERY: Duration = Duration::from_secs(300);
/// A `Retry-After` longer than this is not waited out in full.
const RETRY_AFTER_LIMIT: Duration = Duration::from_secs(600);

/// A resource discovery keeps a slim copy of: what it keeps of each object, and where.
pub(super) trait Watched:
    kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static
{
    type Info: Send + 'static;
    /// The object's name and what is kept of it.
    fn keep(self) -> Option<(String, Self::Info)>;
    /// Where the store keeps this resource.
    fn collection(store: &mut Store) -> &mut Collection<Self::Info>;
}

/// How a watch backs off and when it counts as healthy again.
#[derive(Clone, Debug)]
pub(super) struct WatchSettings {
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A watch re-established after a failure counts as healthy once open this long.
    pub healthy_after: Duration,
    pub answers: ApiAnswers,
    pub streaming: Arc<StreamingLists>,
}

/// Whether the apiserver serves streaming lists; learnt once for all the watches of an agent.
#[derive(Debug, Default)]
pub(super) struct StreamingLists {
    refused: AtomicBool,
}

impl StreamingLists {
    /// `base` with a streaming first list, unless the apiserver refused one.
    fn config(&self, base: &watcher::Config) -> (watcher::Config, bool) {
        match self.refused.load(Ordering::Relaxed) {
            true => (base.clone(), false),
            false => (base.clone().streaming_lists(), true),
        }
    }

    /// Notes a refusal; true the first time.
    fn refuse(&self) -> bool {
        !self.refused.swap(true, Ordering::Relaxed)
    }
}

/// The watch stopped because the apiserver forbids it (with its description).
#[derive(Debug)]
pub(super) struct Forbidden(pub String);

/// What is watched, in the words of logs and of the RBAC rule it needs.
#[derive(Clone, Debug)]
pub(super) struct Subject {
    pub plural: String,
    pub group: String,
    /// `None` for a cluster-wide watch.
    pub namespace: Option<String>,
    /// The verbs the RBAC rule should grant (those of `deploy/`).
    pub verbs: &'static [&'static str],
}

impl Subject {
    pub fn of<K: kube::Resource<DynamicType = ()>>(namespace: Option<&str>, verbs: &'static [&'static str]) -> Self {
        Self {
            plural: K::plural(&()).into_owned(),
            group: K::group(&()).into_owned(),
            namespace: namespace.map(Into::into),
            verbs,
        }
    }

    /// The RBAC rule that allows this watch.
    pub fn rule(&self) -> String {
        let verbs: Vec<String> = self.verbs.iter().map(|v| format!("\"{v}\"")).collect();
        let (group, plural, verbs) = (&self.group, &self.plural, verbs.join(","));
        format!(r#"{{apiGroups: ["{group}"], resources: ["{plural}"], verbs: [{verbs}]}}"#)
    }

    /// A watch error in words an operator can act on; a 403 names the rule to add.
    pub fn describe(&self, e: &watcher::Error) -> String {
        let (verb, cause) = match e {
            watcher::Error::InitialListFailed(cause) => ("list", Some(cause)),
            watcher::Error::WatchStartFailed(cause) | watcher::Error::WatchFailed(cause) => ("watch", Some(cause)),
            watcher::Error::WatchError(status) => return self.describe_status("watch", status),
            watcher::Error::NoResourceVersion => ("list", None),
        };
        match cause {
            Some(kube::Error::Api(status)) => self.describe_status(verb, status),
            Some(cause) => format!("{verb} {} failed: {}", self.plural, chain(cause)),
            None => format!("{verb} {} failed: {e}", self.plural),
        }
    }

    fn describe_status(&self, verb: &str, status: &kube::core::Status) -> String {
        let (plural, rule) = (&self.plural, self.rule());
        match (status.code, &self.namespace) {
            (403, None) => format!(
                "forbidden: the service account lacks RBAC permission to list and watch {plural} cluster-wide: \
                 add a ClusterRole rule {rule} bound to it ({})",
                status.message
            ),
            (403, Some(ns)) => format!(
                "forbidden: the service account lacks RBAC permission to list and watch {plural} in namespace {ns}: \
                 add a Role rule {rule} in namespace {ns} bound to it ({})",
                status.message
            ),
            (401, _) => {
                format!("unauthorized: the apiserver does not accept the service-account token ({})", status.message)
            }
            (code, _) => format!("{verb} {plural} failed: {code} {}: {}", status.reason, status.message.trim()),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} in namespace {ns}", self.plural),
            None => f.write_str(&self.plural),
        }
    }
}

/// Whether a watch is failing, and what that costs: the backoff and the log lines.
struct Health {
    subject: Subject,
    backoff: Backoff,
    streak: FailureStreak,
    /// The latest failure, while the watch is failing.
    failed_at: Option<Instant>,
    /// Since when a watch accepted after that failure has been open.
    open_since: Option<Instant>,
}

impl Health {
    /// Notes a failure; returns how long to wait before the next attempt.
    fn failed(&mut self, error: &str, retry_after: Option<Duration>) -> Duration {
        let now = Instant::now();
        self.failed_at = Some(now);
        self.open_since = None;
        let wait = self.backoff.next_wait().max(retry_after.unwrap_or_default().min(RETRY_AFTER_LIMIT));
        if let Some(report) = self.streak.failed(now) {
            let resource = &self.subject;
            if report.first {
                let message = "kubernetes watch failed; keeping the last known state";
                tracing::warn!(%resource, error, retry_in = ?wait, "{message}");
            } else {
                tracing::warn!(
                    %resource,
                    error,
                    failures = report.failures,
                    suppressed = report.suppressed,
                    since = ?report.since,
                    retry_in = ?wait,
                    "kubernetes watch still failing; keeping the last known state"
                );
            }
        }
        wait
    }

    /// The watch works again (`how` says why we know).
    fn recovered(&mut self, how: &str) {
        self.failed_at = None;
        self.open_since = None;
        self.backoff.reset();
        if let Some(recovery) = self.streak.succeeded(Instant::now()) {
            let resource = &self.subject;
            let (failures, after) = (recovery.failures, recovery.after);
            tracing::info!(%resource, how, failures, ?after, "kubernetes watch recovered");
        }
    }
}

/// The HTTP status of a failed list or watch, when the apiserver answered one.
fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    }
}

/// Follows `api` (filtered by `base`) into the store until the process ends, or until the
/// apiserver forbids it when `stop_if_forbidden` (the caller then reads another source).
pub(super) async fn run<K: Watched>(
    discovery: Discovery,
    api: Api<K>,
    base: watcher::Config,
    subject: Subject,
    settings: WatchSettings,
    stop_if_forbidden: bool,
) -> Result<(), Forbidden> {
    let path = api.resource_url().to_owned();
    let (config, mut streaming) = settings.streaming.config(&base);
    let mut events = watcher::watcher(api.clone(), config).boxed();
    let mut health = Health {
        subject: subject.clone(),
        backoff: Backoff::new(settings.backoff_base, settings.backoff_max),
        streak: FailureStreak::new(REMIND_EVERY),
        failed_at: None,
        open_since: None,
    };
    let mut listing: Option<HashMap<String, K::Info>> = None;
    loop {
        let next = match health.failed_at {
            None => events.next().await,
            Some(failed_at) => {
                // kube's watcher says nothing when a watch is re-established: ask what the
                // apiserver answered, and count the watch as healthy once it stayed open.
                let accepted = settings.answers.watch_accepted(&path).filter(|at| *at > failed_at);
                health.open_since = health.open_since.or(accepted);
                let check_at = match health.open_since {
                    Some(at) if at.elapsed() >= settings.healthy_after => {
                        health.recovered("the watch stayed open");
                        discovery.change(|store| K::collection(store).error = None);
                        continue;
                    }
                    Some(at) => at + settings.healthy_after,
                    None => Instant::now() + settings.healthy_after / 5,
                };
                match tokio::time::timeout_at(check_at.into(), events.next()).await {
                    Ok(next) => next,
                    Err(_) => continue,
                }
            }
        };
        let Some(event) = next else { return Ok(()) };
        match event {
            // The watch fell out of the apiserver's history: routine, the watcher re-lists now.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::debug!(resource = %subject, "kubernetes watch expired; listing again");
            }
            Err(ref e @ watcher::Error::WatchStartFailed(_)) if streaming && status_code(e) == Some(422) => {
                if settings.streaming.refuse() {
                    let error = subject.describe(e);
                    tracing::info!(error, "the apiserver refuses streaming lists: listing in pages instead");
                }
                streaming = false;
                listing = None;
                events = watcher::watcher(api.clone(), base.clone()).boxed();
            }
            Err(e) if stop_if_forbidden && status_code(&e) == Some(403) => {
                return Err(Forbidden(subject.describe(&e)));
            }
            Err(e) => {
                let error = subject.describe(&e);
                let wait = health.failed(&error, settings.answers.take_retry_after(&path));
                discovery.change(|store| K::collection(store).error = Some(error));
                tokio::time::sleep(wait).await;
            }
            Ok(Event::Init) => listing = Some(HashMap::new()),
            Ok(Event::InitApply(object)) => listing.get_or_insert_with(HashMap::new).extend(object.keep()),
            Ok(Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                discovery.change(|store| {
                    let collection = K::collection(store);
                    collection.objects = objects;
                    collection.synced = true;
                    collection.error = None;
                });
                health.recovered("a list completed");
            }
            Ok(Event::Apply(object)) => {
                if let Some((name, info)) = object.keep() {
                    discovery.change(|store| K::collection(store).objects.insert(name, info));
                }
            }
            Ok(Event::Delete(object)) => {
                if let Some(name) = object.meta().name.clone() {
                    discovery.change(|store| K::collection(store).objects.remove(&name));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str, message: &str) -> watcher::Error {
        let status = kube::core::Status::failure(message, reason).with_code(code);
        watcher::Error::InitialListFailed(kube::Error::Api(status.boxed()))
    }

    #[test]
    fn a_forbidden_watch_names_the_missing_rule() {
        let nodes = Subject::of::<k8s_openapi::api::core::v1::Node>(None, &["list", "watch"]);
        let text = nodes.describe(&status(403, "Forbidden", "nodes is forbidden"));
        let expected = concat!(
            "forbidden: the service account lacks RBAC permission to list and watch nodes cluster-wide: ",
            r#"add a ClusterRole rule {apiGroups: [""], resources: ["nodes"], verbs: ["list","watch"]} bound to it"#
        );
        assert!(text.starts_with(expected), "{text}");
        let slices =
            Subject::of::<k8s_openapi::api::discovery::v1::EndpointSlice>(Some("kubenurse"), &["get", "list", "watch"]);
        let text = slices.describe(&status(403, "Forbidden", "endpointslices is forbidden"));
        let rule = r#"{apiGroups: ["discovery.k8s.io"], resources: ["endpointslices"], verbs: ["get","list","watch"]}"#;
        assert!(text.contains(&format!("list and watch endpointslices in namespace kubenurse: add a Role rule {rule}")));
        assert!(text.contains("in namespace kubenurse bound to it (endpointslices is forbidden)"), "{text}");
        let text = slices.describe(&status(500, "InternalError", "etcd is sad"));
        assert_eq!(text, "list endpointslices failed: 500 InternalError: etcd is sad");
    }

    #[test]
    fn a_refused_streaming_list_is_learnt_once_for_every_watch() {
        let streaming = StreamingLists::default();
        let base = watcher::Config::default().labels("a=b");
        let (config, on) = streaming.config(&base);
        assert!(on && config.initial_list_strategy == watcher::InitialListStrategy::StreamingList);
        assert!(streaming.refuse(), "the first refusal is news");
        assert!(!streaming.refuse());
        let (config, on) = streaming.config(&base);
        assert!(!on && config.initial_list_strategy == watcher::InitialListStrategy::ListWatch);
        assert_eq!(config.label_selector.as_deref(), Some("a=b"));
    }
}
