//! The answer to a review that could not be read.

use serde_json::Value;

/// The status message of a refusal.
pub fn message(answer: &Value) -> &str {
    answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no status message in {answer}"))
}

/// An answer to a review that could not be read but whose uid was found: HTTP 200, so that
/// the API server shows the message to the requester.
pub fn assert_invalid_with_uid(status: u16, answer: &Value, uid: &Value, needle: &str) {
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(&answer["response"]["uid"], uid, "{answer}");
    assert_eq!(answer["response"]["status"]["code"], 400, "{answer}");
    assert_eq!(answer["response"]["status"]["reason"], "BadRequest");
    assert!(message(answer).contains(needle), "{answer}");
}
