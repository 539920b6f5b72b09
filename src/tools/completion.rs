//! Shell completion: `agentsecrets completion bash|zsh|fish` prints a script, and the same
//! binary answers kubectl's plugin completion when started as `kubectl_complete-agentsecrets`
//! (kubectl 1.26+ runs that program for `kubectl agentsecrets <TAB>`).

use clap::CommandFactory as _;
use std::ffi::OsString;
use std::path::Path;

use crate::cli::Cli;

/// The program name kubectl runs to complete the `kubectl agentsecrets` plugin.
pub const KUBECTL_COMPLETER: &str = "kubectl_complete-agentsecrets";

/// The name the plugin is run under by kubectl.
pub const KUBECTL_PLUGIN: &str = "kubectl-agentsecrets";

/// Cobra's `ShellCompDirectiveNoFileComp`: kubectl's shell script must not fall back to file
/// names when we offered candidates.
const NO_FILE_COMPLETION: u8 = 4;
/// Cobra's `ShellCompDirectiveDefault`: nothing to offer, let the shell do its default.
const DEFAULT_COMPLETION: u8 = 0;

/// The completion script for `shell`, for the binary installed as `bin_name`.
pub fn script(shell: clap_complete::Shell, bin_name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), bin_name, &mut out);
    out
}

/// Whether this process was started as kubectl's completer (a symlink or copy named
/// `kubectl_complete-agentsecrets`).
pub fn started_as_kubectl_completer(argv0: &Path) -> bool {
    argv0
        .file_stem()
        .is_some_and(|name| name == KUBECTL_COMPLETER)
}

/// Answer kubectl's completion request in Cobra's protocol. kubectl passes the words after
/// `kubectl agentsecrets`, the last being the one being completed (possibly empty); the
/// answer is one candidate per line (`value<TAB>help`) and a last line `:<directive>`.
pub fn kubectl_answer(words: Vec<OsString>, current_dir: Option<&Path>) -> String {
    let mut args = vec![OsString::from("agentsecrets")];
    args.extend(words);
    if args.len() == 1 {
        args.push(OsString::new());
    }
    let index = args.len() - 1;
    let candidates = clap_complete::engine::complete(&mut Cli::command(), args, index, current_dir)
        .unwrap_or_default();
    let mut out = String::new();
    for candidate in candidates.iter().filter(|c| !c.is_hide_set()) {
        out.push_str(&candidate.get_value().to_string_lossy());
        if let Some(help) = candidate.get_help() {
            // One line per candidate: the first line of the help only.
            let help = help.to_string();
            if let Some(first) = help.lines().next().filter(|l| !l.is_empty()) {
                out.push('\t');
                out.push_str(first);
            }
        }
        out.push('\n');
    }
    let directive = if candidates.is_empty() {
        DEFAULT_COMPLETION
    } else {
        NO_FILE_COMPLETION
    };
    out.push_str(&format!(":{directive}\n"));
    out
}

/// If started as kubectl's completer, answer and say so; the caller then exits.
pub fn answer_kubectl_if_asked() -> bool {
    let mut args = std::env::args_os();
    let Some(argv0) = args.next() else {
        return false;
    };
    if !started_as_kubectl_completer(Path::new(&argv0)) {
        return false;
    }
    let current_dir = std::env::current_dir().ok();
    print!("{}", kubectl_answer(args.collect(), current_dir.as_deref()));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(words: &[&str]) -> Vec<String> {
        kubectl_answer(words.iter().map(OsString::from).collect(), None)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn values(lines: &[String]) -> Vec<&str> {
        lines
            .iter()
            .filter(|l| !l.starts_with(':'))
            .map(|l| l.split('\t').next().unwrap_or_default())
            .collect()
    }

    #[test]
    fn the_completer_is_recognised_by_its_program_name() {
        assert!(started_as_kubectl_completer(Path::new(
            "/usr/local/bin/kubectl_complete-agentsecrets"
        )));
        assert!(started_as_kubectl_completer(Path::new(
            "kubectl_complete-agentsecrets.exe"
        )));
        assert!(!started_as_kubectl_completer(Path::new(
            "/usr/local/bin/kubectl-agentsecrets"
        )));
        assert!(!started_as_kubectl_completer(Path::new("agentsecrets")));
    }

    #[test]
    fn subcommands_complete_with_their_help_and_no_file_names() {
        let lines = answer(&["li"]);
        assert_eq!(values(&lines), ["list"]);
        assert!(lines[0].starts_with("list\tList secrets"), "{lines:?}");
        assert_eq!(lines.last().map(String::as_str), Some(":4"));

        let all = answer(&[""]);
        for command in ["set", "list", "delete", "keys", "inject", "completion"] {
            assert!(values(&all).contains(&command), "{command}: {all:?}");
        }
    }

    #[test]
    fn flags_and_their_values_complete() {
        let flags = answer(&["list", "--all"]);
        assert_eq!(values(&flags), ["--all-namespaces"]);
        let formats = answer(&["list", "-o", ""]);
        assert_eq!(values(&formats), ["json", "yaml", "wide"]);
        let connection = answer(&["set", "X_TOKEN", "--kube"]);
        assert_eq!(values(&connection), ["--kubeconfig"]);
    }

    #[test]
    fn nothing_to_offer_leaves_the_shell_its_default() {
        let lines = answer(&["set", "--owner", ""]);
        assert_eq!(lines, [":0"]);
    }

    #[test]
    fn scripts_are_generated_for_the_three_shells() {
        for (shell, needle) in [
            (clap_complete::Shell::Bash, "complete -F _agentsecrets"),
            (clap_complete::Shell::Zsh, "#compdef agentsecrets"),
            (clap_complete::Shell::Fish, "complete -c agentsecrets"),
        ] {
            let text = String::from_utf8(script(shell, "agentsecrets")).unwrap();
            assert!(text.contains(needle), "{shell}: {text:.200}");
            assert!(text.contains("all-namespaces"), "{shell}");
        }
    }
}
