//! Kubernetes Events on a pod whose role cannot be assumed (DESIGN §8), at most one per pod and
//! reason every few minutes, published in the background so no request waits on the API.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// One event per pod and reason within this window: a failing pod's SDK retries every few
/// seconds, and the event is there to be read, not counted.
const REPEAT_WINDOW: Duration = Duration::from_secs(300);
const MAX_TRACKED: u64 = 10_000;
/// The API server refuses longer notes.
const MAX_NOTE_CHARS: usize = 1000;

/// The pod an event is about.
#[derive(Debug, Clone, Copy)]
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

pub struct EventSink {
    recorder: Recorder,
    recent: moka::sync::Cache<(String, &'static str), ()>,
}

impl EventSink {
    /// `instance` names this agent's pod as the event's reporter.
    pub fn new(client: kube::Client, instance: Option<String>) -> Arc<Self> {
        let reporter = Reporter {
            controller: "irsa-imds".into(),
            instance,
        };
        Arc::new(EventSink {
            recorder: Recorder::new(client, reporter),
            recent: moka::sync::Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_live(REPEAT_WINDOW)
                .build(),
        })
    }

    /// A Warning `AssumeRoleFailed` on `pod`; `reason` is the failure's metric label (the
    /// de-duplication key), `note` what the operator reads.
    pub fn role_failed(self: &Arc<Self>, pod: PodRef<'_>, reason: &'static str, note: &str) {
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
        let event = Event {
            type_: EventType::Warning,
            reason: "AssumeRoleFailed".into(),
            note: Some(note.chars().take(MAX_NOTE_CHARS).collect()),
            action: "AssumeRoleWithWebIdentity".into(),
            secondary: None,
        };
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(err) = this.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %err, "cannot publish event");
            }
        });
    }
}
