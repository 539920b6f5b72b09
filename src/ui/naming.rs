//! The naming rule as the page states it, derived from `api::validate_env_name` itself so the
//! words follow the rule when the reserved list changes.

use crate::api::validate_env_name;

/// The naming conventions table: name, what it is for.
pub const CONVENTIONS: &[(&str, &str)] = &[
    ("SERVICE_API_KEY", "An API key for a service"),
    (
        "SERVICE_BEARER_TOKEN",
        "A bearer token sent in an Authorization header",
    ),
    ("SERVICE_SECRET", "A client secret or signing secret"),
    ("DB_PASSWORD", "A database password"),
];

/// Names the sandbox runtime is known to depend on; the rule lists those the validator
/// actually refuses.
const RESERVED_CANDIDATES: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "SHELL",
    "LD_PRELOAD",
    "NODE_OPTIONS",
    "PYTHONPATH",
    "HTTP_PROXY",
];

/// Reserved prefixes, shown as `PREFIX…` when a name under them is refused.
const PREFIX_CANDIDATES: &[&str] = &["LD_", "DYLD_", "KUBERNETES_"];

/// The rule shown under the name field.
pub fn rule(extra_reserved: &[String]) -> String {
    let refused = |name: &str| validate_env_name(name, extra_reserved).is_err();
    let mut names: Vec<String> = RESERVED_CANDIDATES
        .iter()
        .filter(|n| refused(n))
        .map(|n| (*n).to_owned())
        .collect();
    names.extend(extra_reserved.iter().take(4).cloned());
    names.dedup();
    let prefixes: Vec<String> = PREFIX_CANDIDATES
        .iter()
        .filter(|p| refused(&format!("{p}AGENTSECRETS_PROBE")))
        .map(|p| (*p).to_owned())
        .collect();
    let mut reserved = names.join(", ");
    if !prefixes.is_empty() {
        let starting = format!("names starting with {}", join_words(&prefixes, "or"));
        reserved = if reserved.is_empty() {
            starting
        } else {
            format!("{reserved}, and {starting}")
        };
    }
    format!(
        "Uppercase letters A–Z, digits 0–9 and underscores, not starting with a digit, e.g. GITHUB_API_KEY. Names the sandbox itself relies on are refused: {reserved}."
    )
}

fn join_words(words: &[String], conjunction: &str) -> String {
    match words {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} {conjunction} {last}", init.join(", ")),
    }
}

/// What is wrong with `name`, in a sentence, or `None` when it is a valid name.
pub fn problem(name: &str, extra_reserved: &[String]) -> Option<String> {
    let error = validate_env_name(name, extra_reserved).err()?;
    Some(match error {
        crate::api::EnvNameError::Empty => "Enter a name.".to_owned(),
        crate::api::EnvNameError::TooLong(_) => "The name is longer than 255 characters.".into(),
        crate::api::EnvNameError::Invalid(_) if name.starts_with(|c: char| c.is_ascii_digit()) => {
            "The name cannot start with a digit.".into()
        }
        crate::api::EnvNameError::Invalid(_)
            if name.chars().any(|c| c.is_ascii_lowercase())
                && validate_env_name(&name.to_ascii_uppercase(), extra_reserved).is_ok() =>
        {
            format!("Use uppercase letters: {}.", name.to_ascii_uppercase())
        }
        crate::api::EnvNameError::Invalid(_) => {
            "Use only uppercase letters A–Z, digits 0–9 and underscores.".into()
        }
        crate::api::EnvNameError::Reserved(_) => format!(
            "{name} is reserved: the sandbox itself relies on it, so a secret cannot replace it. Choose another name."
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_lists_names_the_validator_refuses() {
        let text = rule(&["MY_RESERVED".to_owned()]);
        assert!(text.contains("PATH"), "{text}");
        assert!(
            text.contains("names starting with LD_, DYLD_ or KUBERNETES_"),
            "{text}"
        );
        assert!(text.contains("MY_RESERVED"), "{text}");
        for candidate in RESERVED_CANDIDATES {
            assert_eq!(
                text.contains(candidate),
                validate_env_name(candidate, &[]).is_err(),
                "{candidate}"
            );
        }
    }

    #[test]
    fn problems_are_sentences_a_user_can_act_on() {
        assert_eq!(problem("GITHUB_API_KEY", &[]), None);
        assert_eq!(problem("", &[]).unwrap(), "Enter a name.");
        assert_eq!(
            problem("1PASSWORD", &[]).unwrap(),
            "The name cannot start with a digit."
        );
        assert_eq!(
            problem("github_token", &[]).unwrap(),
            "Use uppercase letters: GITHUB_TOKEN."
        );
        assert!(problem("A-B", &[]).unwrap().contains("only uppercase"));
        assert!(problem("PATH", &[]).unwrap().contains("PATH is reserved"));
        assert!(problem("X", &["X".into()]).unwrap().contains("reserved"));
    }
}
