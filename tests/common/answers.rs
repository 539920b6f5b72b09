//! Reading the webhook's answers, and the objects they apply to.

use serde_json::Value;

/// Apply the answer's JSON patch (if any) to `object`.
pub fn patched(object: &Value, answer: &Value) -> Value {
    let mut object = object.clone();
    if let Some(patch) = patch_text(answer) {
        let patch: json_patch::Patch = serde_json::from_str(&patch).unwrap();
        json_patch::patch(&mut object, &patch).unwrap();
    }
    object
}

/// The decoded JSON patch of an answer, or `None`. The API server's Go types decode `patch`
/// ([]byte) from a base64 string.
pub fn patch_text(answer: &Value) -> Option<String> {
    use base64::Engine as _;
    answer["response"].get("patch").map(|p| {
        let p = p.as_str().expect("patch is a base64 string");
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(p).unwrap()).unwrap()
    })
}
