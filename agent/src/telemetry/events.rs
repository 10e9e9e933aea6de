//! Kubernetes Events on a pod whose role cannot be assumed (DESIGN §8), at most one per pod and
//! reason every few minutes, published in the background so no request waits on the API.
//!
//! Each is a new `events.k8s.io/v1` Event (create only). kube's `Recorder` would patch a repeat
//! into an event series instead, which needs `patch` on every Event of the cluster: the
//! de-duplication window here already keeps repeats rare, so the agent's ClusterRole grants
//! `create` alone (least privilege; a stolen token cannot rewrite other components' Events).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

/// One event per pod and reason within this window: a failing pod's SDK retries every few
/// seconds, and the event is there to be read, not counted.
const REPEAT_WINDOW: Duration = Duration::from_secs(300);
const MAX_TRACKED: u64 = 10_000;
/// The API server refuses longer notes.
const MAX_NOTE_CHARS: usize = 1000;

/// The pod an event is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// The Events' `reportingController`.
const CONTROLLER: &str = "irsa-imds";

pub(crate) struct EventSink {
    client: kube::Client,
    /// The Events' `reportingInstance`: this agent's pod.
    instance: String,
    recent: moka::sync::Cache<(String, &'static str), ()>,
}

impl EventSink {
    /// `instance` names this agent's pod as the event's reporter.
    pub(crate) fn new(client: kube::Client, instance: Option<String>) -> Arc<Self> {
        Arc::new(EventSink {
            client,
            instance: instance.unwrap_or_else(|| CONTROLLER.into()),
            recent: moka::sync::Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_live(REPEAT_WINDOW)
                .build(),
        })
    }

    /// A Warning `AssumeRoleFailed` on `pod`; `reason` is the failure's metric label (the
    /// de-duplication key), `note` what the operator reads.
    pub(crate) fn role_failed(self: &Arc<Self>, pod: PodRef<'_>, reason: &'static str, note: &str) {
        let key = (pod.uid.to_string(), reason);
        if self.recent.contains_key(&key) {
            return;
        }
        self.recent.insert(key, ());
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.into()),
            namespace: Some(pod.namespace.into()),
            uid: Some(pod.uid.into()),
            ..Default::default()
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                // Unique per pod and instant, as kubectl and kube's recorder name them.
                name: Some(format!("{}.{:x}", pod.name, now.as_nanosecond())),
                namespace: Some(pod.namespace.into()),
                ..Default::default()
            },
            type_: Some("Warning".into()),
            reason: Some("AssumeRoleFailed".into()),
            action: Some("AssumeRoleWithWebIdentity".into()),
            note: Some(note.chars().take(MAX_NOTE_CHARS).collect()),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference),
            reporting_controller: Some(CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let (api, namespace) = (self.client.clone(), pod.namespace.to_string());
        tokio::spawn(async move {
            let events: Api<Event> = Api::namespaced(api, &namespace);
            if let Err(err) = events.create(&PostParams::default(), &event).await {
                tracing::warn!(error = %err, "cannot publish event");
            }
        });
    }
}
