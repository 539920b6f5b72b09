//! Building JSON patches (RFC 6902) against the object exactly as the API server sent it.
//!
//! Patches are made of targeted operations rather than by re-serialising a typed object:
//! a typed round trip would drop fields newer than the compiled Kubernetes API and the patch
//! would then delete them.

use json_patch::{AddOperation, PatchOperation, RemoveOperation, ReplaceOperation};
use jsonptr::PointerBuf;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A pointer from path segments; `/` and `~` inside a segment are escaped.
pub fn pointer(segments: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(segments.iter().copied())
}

pub fn add(segments: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(segments),
        value,
    })
}

pub fn replace(segments: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(segments),
        value,
    })
}

pub fn remove(segments: &[&str]) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation {
        path: pointer(segments),
    })
}

/// Set annotations: one `add` of the whole map when the object has none (a JSON patch cannot
/// add a member to a missing parent), else one `add` per key (`add` replaces existing keys).
pub fn set_annotations(
    existing: Option<&BTreeMap<String, String>>,
    entries: &[(&str, String)],
) -> Vec<PatchOperation> {
    match existing {
        None => {
            let map: Map<String, Value> = entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::String(v.clone())))
                .collect();
            vec![add(&["metadata", "annotations"], Value::Object(map))]
        }
        Some(_) => entries
            .iter()
            .map(|(k, v)| add(&["metadata", "annotations", k], Value::String(v.clone())))
            .collect(),
    }
}

/// Writes a JSON patch straight to its serialised form: a pod admission adds dozens of env
/// entries, and building each as a `serde_json::Value` (then serialising and dropping it) cost
/// more than the cryptography.
pub struct PatchWriter {
    buf: Vec<u8>,
    empty: bool,
}

impl Default for PatchWriter {
    fn default() -> Self {
        let mut buf = Vec::with_capacity(1024);
        buf.push(b'[');
        Self { buf, empty: true }
    }
}

/// A JSON string, escaped.
pub fn write_str(buf: &mut Vec<u8>, text: &str) {
    // Writing to a Vec cannot fail, and a &str always serialises.
    let _ = serde_json::to_writer(&mut *buf, text);
}

impl PatchWriter {
    /// Append `{"op": op, "path": <segments>, "value": <written by value>}`.
    pub fn op(&mut self, op: &str, segments: &[&str], value: impl FnOnce(&mut Vec<u8>)) {
        if !self.empty {
            self.buf.push(b',');
        }
        self.empty = false;
        self.buf.extend_from_slice(b"{\"op\":\"");
        self.buf.extend_from_slice(op.as_bytes());
        self.buf.extend_from_slice(b"\",\"path\":");
        write_str(&mut self.buf, &pointer(segments).to_string());
        self.buf.extend_from_slice(b",\"value\":");
        value(&mut self.buf);
        self.buf.push(b'}');
    }

    /// Append an `add` of a string.
    pub fn add_str(&mut self, segments: &[&str], value: &str) {
        self.op("add", segments, |buf| write_str(buf, value));
    }

    /// Whether no operation was written.
    pub fn is_empty(&self) -> bool {
        self.empty
    }

    /// The patch as JSON text.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(b']');
        self.buf
    }
}

/// Annotations through a [`PatchWriter`], as [`set_annotations`] does.
pub fn write_annotations(
    writer: &mut PatchWriter,
    existing: Option<&BTreeMap<String, String>>,
    entries: &[(&str, String)],
) {
    match existing {
        None => writer.op("add", &["metadata", "annotations"], |buf| {
            buf.push(b'{');
            for (i, (key, value)) in entries.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                write_str(buf, key);
                buf.push(b':');
                write_str(buf, value);
            }
            buf.push(b'}');
        }),
        Some(_) => {
            for (key, value) in entries {
                writer.add_str(&["metadata", "annotations", key], value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn written_patches_equal_the_built_ones() {
        for existing in [None, Some(BTreeMap::new())] {
            let entries = [
                ("agentsecrets.io/injected", "A,B".to_owned()),
                ("x\"y", "q\"\\".to_owned()),
            ];
            let mut writer = PatchWriter::default();
            writer.op("add", &["spec", "containers", "0", "env", "-"], |buf| {
                buf.extend_from_slice(br#"{"name":"A"}"#);
            });
            write_annotations(&mut writer, existing.as_ref(), &entries);
            let written: json_patch::Patch = serde_json::from_slice(&writer.finish()).unwrap();
            let mut built = vec![add(
                &["spec", "containers", "0", "env", "-"],
                json!({"name": "A"}),
            )];
            built.extend(set_annotations(existing.as_ref(), &entries));
            assert_eq!(written, json_patch::Patch(built));
        }
        assert_eq!(PatchWriter::default().finish(), b"[]");
    }

    #[test]
    fn annotation_keys_with_slashes_are_escaped() {
        let ops = set_annotations(
            Some(&BTreeMap::new()),
            &[("agentsecrets.io/injected", "A".into())],
        );
        assert_eq!(
            serde_json::to_value(&ops).unwrap(),
            json!([{"op": "add", "path": "/metadata/annotations/agentsecrets.io~1injected", "value": "A"}])
        );
    }

    #[test]
    fn annotations_are_created_when_missing() {
        let mut doc = json!({"metadata": {"name": "p"}});
        let ops = set_annotations(None, &[("a/b", "1".into()), ("c", "2".into())]);
        json_patch::patch(&mut doc, &ops).unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"name": "p", "annotations": {"a/b": "1", "c": "2"}}})
        );
    }
}
