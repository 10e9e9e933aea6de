//! The JSON log line: one flat object per event, every key once.
//!
//! tracing-subscriber's own JSON format nests span fields under `span`/`spans` (so an audit line's
//! pod sits two levels down) and writes an event field named `target` beside its own `target`
//! key, giving a line with two `"target"` keys that log pipelines drop or mangle. This format puts
//! the fields of the enclosing spans (outermost first), then the event's fields, at the top level
//! of one map, so a key appears once (the innermost value wins), and adds `timestamp`, `level`,
//! `target` and `node` last, which no field can shadow.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats events as flat JSON objects naming the node.
#[derive(Debug, Clone)]
pub struct JsonLine {
    node: String,
}

impl JsonLine {
    pub fn new(node: &str) -> Self {
        JsonLine {
            node: node.to_string(),
        }
    }
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut map = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&f.fields)
                {
                    map.extend(fields);
                }
            }
        }
        event.record(&mut Fields(&mut map));
        let now = time::OffsetDateTime::now_utc();
        let ts = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        map.insert("timestamp".into(), ts.into());
        map.insert("level".into(), event.metadata().level().as_str().into());
        map.insert("target".into(), event.metadata().target().into());
        map.insert("node".into(), self.node.clone().into());
        let line = serde_json::to_string(&Value::Object(map)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// Counts each key of every top-level object in `line` (serde_json would silently keep the
    /// last of duplicate keys, so they are counted on the raw text with a real tokenizer).
    fn top_level_keys(line: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(line).expect("line parses");
        assert!(v.is_object(), "{line}");
        let mut keys = Vec::new();
        let mut depth = 0usize;
        let mut chars = line.char_indices().peekable();
        let mut expect_key = false;
        while let Some((i, c)) = chars.next() {
            match c {
                '{' | '[' => {
                    depth += 1;
                    expect_key = c == '{' && depth == 1;
                }
                '}' | ']' => depth = depth.saturating_sub(1),
                ',' if depth == 1 => expect_key = true,
                '"' => {
                    let start = i + 1;
                    let mut end = start;
                    let mut escaped = false;
                    for (j, d) in chars.by_ref() {
                        if escaped {
                            escaped = false;
                        } else if d == '\\' {
                            escaped = true;
                        } else if d == '"' {
                            end = j;
                            break;
                        }
                    }
                    if depth == 1 && expect_key {
                        keys.push(line[start..end].to_string());
                        expect_key = false;
                    }
                }
                _ => {}
            }
        }
        keys
    }

    #[test]
    fn every_json_line_parses_has_unique_keys_and_names_the_node() {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_max_level(tracing::Level::DEBUG)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine::new("node-7"))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // The rule install line once carried a field named `target`.
            tracing::info!(
                target = "10.0.0.5:8181",
                "field named like the line's own key"
            );
            let span = tracing::info_span!(
                "imds",
                source_ip = "10.0.1.7",
                pod = tracing::field::Empty,
                namespace = "team-a"
            );
            let _g = span.enter();
            span.record("pod", "api-0");
            tracing::info!(
                target: "audit",
                role = "arn:aws:iam::123456789012:role/r",
                source_ip = "10.0.1.7",
                "credentials vended"
            );
            tracing::debug!(reason = "no_role", "no credentials");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for line in &lines {
            let keys = top_level_keys(line);
            let mut unique = keys.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), keys.len(), "duplicate keys in {line}");
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["node"], "node-7", "{line}");
            assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
        }
        let audit: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(audit["target"], "audit");
        assert_eq!(audit["pod"], "api-0", "span fields at the top level");
        assert_eq!(audit["namespace"], "team-a");
        assert_eq!(audit["message"], "credentials vended");
        let debug: Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(debug["level"], "DEBUG");
        assert_eq!(debug["reason"], "no_role");
    }

    #[test]
    fn key_counter_sees_duplicates() {
        let keys = top_level_keys(r#"{"target":"a","x":{"target":1},"target":"b"}"#);
        assert_eq!(keys, ["target", "x", "target"]);
    }
}
