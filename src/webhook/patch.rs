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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
