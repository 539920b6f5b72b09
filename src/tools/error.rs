//! How the people-facing commands fail, and the one place that turns a failure into an exit
//! code (documented in docs/cli.md and in `agentsecrets --help`).

use std::process::ExitCode;

/// The exit codes of `agentsecrets`. Scripts branch on these, so they only ever grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The command did what was asked.
    Ok = 0,
    /// Any other failure (bad file, value mismatch, declined confirmation, CRD missing, ...).
    Error = 1,
    /// The command line is wrong: unknown flag, missing argument, invalid value (clap uses 2
    /// for its own usage errors; ours follow it).
    Usage = 2,
    /// The secret (or the object asked for) does not exist.
    NotFound = 3,
    /// The API server refused: unauthenticated, forbidden by RBAC, or denied by admission
    /// or validation (webhook, CEL rules, conflicts).
    Refused = 4,
    /// No cluster to talk to: no kubeconfig, an unknown context, or the API server is not
    /// reachable.
    NoCluster = 5,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The table printed at the end of `agentsecrets --help`; a test keeps it in step with
/// [`Exit`].
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  error (anything not listed below)
  2  usage: unknown flag, missing or invalid argument
  3  not found: no such secret
  4  refused by the API server: unauthenticated, forbidden (RBAC) or denied by admission
  5  no cluster: no kubeconfig, unknown context, or the API server is unreachable";

/// A failure of the people-facing commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to accept the arguments: {0}")]
    InvalidArgument(String),
    #[error("failed to find {what}")]
    NotFound { what: String },
    #[error("failed to load a cluster configuration (no cluster configured): {reason}")]
    NoCluster { reason: String },
    #[error("failed to reach the API server (no cluster reachable with this context): {reason}")]
    Unreachable { reason: String },
    #[error(
        "failed to {action}: the AgentSecret CRD is not installed in this cluster: install agent-secrets (helm install, or kubectl apply -f crds/)"
    )]
    CrdMissing { action: String },
    #[error(
        "failed to {action}: forbidden in namespace {namespace:?}: {message}; ask for a Role allowing agentsecrets.agentsecrets.io"
    )]
    Forbidden {
        action: String,
        namespace: String,
        message: String,
    },
    #[error("failed to {action}: the API server refused: {message}")]
    Refused { action: String, message: String },
    #[error("failed to {action}: {reason}")]
    Request { action: String, reason: String },
    #[error("failed to read the value: the two entries differ; nothing was written")]
    ValueMismatch,
    #[error("failed to read the value from {from}: {source}")]
    ReadValue {
        from: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to get a confirmation: {0}")]
    Declined(String),
}

impl Error {
    /// Turn an API error into one a person can act on, naming what was being done.
    pub fn from_api(action: &str, error: kube::Error, namespace: &str) -> Self {
        let action = action.to_owned();
        match error {
            kube::Error::Api(status)
                if status.code == 404
                    && status
                        .message
                        .contains("the server could not find the requested resource") =>
            {
                Self::CrdMissing { action }
            }
            kube::Error::Api(status) if status.code == 404 => Self::NotFound {
                what: status.message,
            },
            kube::Error::Api(status) if status.code == 403 && is_rbac(&status.message) => {
                Self::Forbidden {
                    action,
                    namespace: namespace.to_owned(),
                    message: status.message,
                }
            }
            kube::Error::Api(status) if refused_status(status.code) => Self::Refused {
                action,
                message: status.message,
            },
            kube::Error::Api(status) => Self::Request {
                action,
                reason: status.message,
            },
            error @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => Self::Unreachable {
                reason: error.to_string(),
            },
            error => Self::Request {
                action,
                reason: error.to_string(),
            },
        }
    }

    /// This error with every occurrence of `secret` in the server's text replaced: an API
    /// server's validation message may quote the field it refuses, and that field may be the
    /// value being written.
    pub fn redacting(self, secret: &str) -> Self {
        if secret.is_empty() {
            return self;
        }
        let clean = |text: String| text.replace(secret, "<redacted>");
        match self {
            Self::NotFound { what } => Self::NotFound { what: clean(what) },
            Self::Forbidden {
                action,
                namespace,
                message,
            } => Self::Forbidden {
                action,
                namespace,
                message: clean(message),
            },
            Self::Refused { action, message } => Self::Refused {
                action,
                message: clean(message),
            },
            Self::Request { action, reason } => Self::Request {
                action,
                reason: clean(reason),
            },
            Self::Unreachable { reason } => Self::Unreachable {
                reason: clean(reason),
            },
            other => other,
        }
    }

    /// The exit code of this failure.
    pub fn exit(&self) -> Exit {
        match self {
            Self::InvalidArgument(_) => Exit::Usage,
            Self::NotFound { .. } => Exit::NotFound,
            Self::Forbidden { .. } | Self::Refused { .. } => Exit::Refused,
            Self::NoCluster { .. } | Self::Unreachable { .. } => Exit::NoCluster,
            Self::CrdMissing { .. }
            | Self::Request { .. }
            | Self::ValueMismatch
            | Self::ReadValue { .. }
            | Self::Declined(_) => Exit::Error,
        }
    }
}

/// RBAC refusals read "... is forbidden: User ... cannot ..."; an admission denial is a 403
/// too, but its remedy is not a Role.
fn is_rbac(message: &str) -> bool {
    message.contains(" cannot ")
}

/// Status codes by which the API server refuses a request it understood.
fn refused_status(code: u16) -> bool {
    matches!(code, 400 | 401 | 403 | 409 | 422)
}

/// The exit code for any error of any command: the first typed [`Error`] in the chain
/// decides; an API error that was not explained is classified by its status; everything
/// else is a plain error.
pub fn exit_code(error: &anyhow::Error) -> Exit {
    for cause in error.chain() {
        if let Some(error) = cause.downcast_ref::<Error>() {
            return error.exit();
        }
        if let Some(kube::Error::Api(status)) = cause.downcast_ref::<kube::Error>() {
            return match status.code {
                404 => Exit::NotFound,
                code if refused_status(code) => Exit::Refused,
                _ => Exit::Error,
            };
        }
    }
    Exit::Error
}

/// Print the failure, if any, the way kubectl does (`error: ...` on stderr) and give the
/// process its exit code.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(Exit::Ok.code()),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(exit_code(&error).code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, message: &str) -> kube::Error {
        let mut status = kube::core::Status::failure(message, "");
        status.code = code;
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn api_errors_are_explained_and_classified() {
        let missing = Error::from_api(
            "list",
            api(404, "the server could not find the requested resource"),
            "ns",
        );
        assert!(missing.to_string().contains("CRD is not installed"));
        assert_eq!(missing.exit(), Exit::Error);

        let gone = Error::from_api(
            "delete",
            api(404, "agentsecrets.agentsecrets.io \"x\" not found"),
            "ns",
        );
        assert_eq!(gone.exit(), Exit::NotFound);

        let forbidden = Error::from_api(
            "list",
            api(
                403,
                "agentsecrets is forbidden: User \"dev\" cannot list resource",
            ),
            "ns",
        );
        assert!(
            forbidden.to_string().contains("ask for a Role"),
            "{forbidden}"
        );
        assert_eq!(forbidden.exit(), Exit::Refused);

        let denied = Error::from_api(
            "create",
            api(
                403,
                "admission webhook \"agentsecrets.io\" denied the request: duplicate",
            ),
            "ns",
        );
        assert!(!denied.to_string().contains("ask for a Role"), "{denied}");
        assert_eq!(denied.exit(), Exit::Refused);

        for code in [400, 401, 409, 422] {
            assert_eq!(
                Error::from_api("create", api(code, "no"), "ns").exit(),
                Exit::Refused,
                "{code}"
            );
        }
        assert_eq!(
            Error::from_api("list", api(500, "etcd"), "ns").exit(),
            Exit::Error
        );
    }

    #[test]
    fn a_value_quoted_by_the_server_is_redacted() {
        let error = Error::from_api(
            "create the AgentSecret",
            api(
                422,
                "AgentSecret \"x\" is invalid: spec.value: Invalid value: \"canary-quoted\"",
            ),
            "ns",
        )
        .redacting("canary-quoted");
        let text = format!("{error} {error:?}");
        assert!(!text.contains("canary"), "{text}");
        assert!(text.contains("Invalid value: \"<redacted>\""), "{text}");
        assert_eq!(error.exit(), Exit::Refused);
    }

    #[test]
    fn the_exit_code_comes_from_the_first_typed_error_in_the_chain() {
        let wrapped = anyhow::Error::new(Error::NotFound {
            what: "secret A".into(),
        })
        .context("while deleting");
        assert_eq!(exit_code(&wrapped), Exit::NotFound);
        let raw = anyhow::Error::new(api(403, "forbidden")).context("while listing");
        assert_eq!(exit_code(&raw), Exit::Refused);
        assert_eq!(exit_code(&anyhow::anyhow!("disk full")), Exit::Error);
        assert_eq!(
            exit_code(&Error::InvalidArgument("bad".into()).into()),
            Exit::Usage
        );
        assert_eq!(
            exit_code(
                &Error::NoCluster {
                    reason: "none".into()
                }
                .into()
            ),
            Exit::NoCluster
        );
    }

    #[test]
    fn the_help_table_lists_every_exit_code() {
        for exit in [
            Exit::Ok,
            Exit::Error,
            Exit::Usage,
            Exit::NotFound,
            Exit::Refused,
            Exit::NoCluster,
        ] {
            assert!(
                EXIT_CODES_HELP.contains(&format!("\n  {}  ", exit.code())),
                "{exit:?} missing from the help"
            );
        }
    }
}
