//! Writing a pod's injection as a JSON patch: one `secretKeyRef` env entry per secret and
//! container, never a value.

use super::super::patch::{PatchWriter, write_str};
use super::super::review::{ContainerView, PodView};

/// Writes the env entries of one pod's injection.
pub(super) struct ReferenceWriter<'a> {
    /// Env names to inject, sorted.
    pub names: &'a [&'a str],
    /// The pod-scoped Secret the entries refer to.
    pub secret_name: &'a str,
}

/// What an injection wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Written {
    /// For each of the writer's names, whether some container received it.
    pub received: Vec<bool>,
    /// `container/NAME` entries the pod spec already set, which win.
    pub skipped: Vec<String>,
}

impl ReferenceWriter<'_> {
    /// Inject into each container of `containers`, the pod spec's `field`.
    pub fn containers(
        &self,
        writer: &mut PatchWriter,
        field: &str,
        containers: &[ContainerView],
        written: &mut Written,
    ) {
        if written.received.len() != self.names.len() {
            written.received = vec![false; self.names.len()];
        }
        for (i, container) in containers.iter().enumerate() {
            // The secretless proxy of an earlier invocation (`secretless::check_reserved`
            // admits that one only) never receives values from a pod-scoped Secret.
            if container.name == crate::api::PROXY_CONTAINER_NAME {
                continue;
            }
            self.container(writer, field, i, container, written);
        }
    }

    /// `{"name": N, "valueFrom": {"secretKeyRef": {"name": <secret>, "key": N}}}`
    fn reference(&self, buf: &mut Vec<u8>, name: &str) {
        buf.extend_from_slice(b"{\"name\":");
        write_str(buf, name);
        buf.extend_from_slice(b",\"valueFrom\":{\"secretKeyRef\":{\"name\":");
        write_str(buf, self.secret_name);
        buf.extend_from_slice(b",\"key\":");
        write_str(buf, name);
        buf.extend_from_slice(b"}}}");
    }

    fn container(
        &self,
        writer: &mut PatchWriter,
        field: &str,
        index: usize,
        container: &ContainerView,
        written: &mut Written,
    ) {
        let i = index.to_string();
        let Some(env) = container.env.as_ref() else {
            writer.op("add", &["spec", field, &i, "env"], |buf| {
                buf.push(b'[');
                for (n, name) in self.names.iter().enumerate() {
                    if n > 0 {
                        buf.push(b',');
                    }
                    self.reference(buf, name);
                }
                buf.push(b']');
            });
            written.received.iter_mut().for_each(|done| *done = true);
            return;
        };
        for (n, name) in self.names.iter().enumerate() {
            match env.iter().find(|e| e.name == *name) {
                None => {
                    writer.op("add", &["spec", field, &i, "env", "-"], |buf| {
                        self.reference(buf, name);
                    });
                    written.received[n] = true;
                }
                Some(entry) => {
                    // Our own entry from an earlier invocation of this admission (reinvocation
                    // after another webhook changed the pod): the same request names the same
                    // Secret, so it stands as it is.
                    let ours = entry
                        .value_from
                        .as_ref()
                        .and_then(|v| v.secret_key_ref.as_ref())
                        .is_some_and(|r| r.name == self.secret_name && r.key == *name);
                    if ours {
                        written.received[n] = true;
                    } else {
                        written.skipped.push(format!("{}/{name}", container.name));
                    }
                }
            }
        }
    }
}

/// `container/NAME` of an env entry (in any container) that refers to `secret_name` under a
/// key not in `names`: left from an earlier invocation for a secret not injected now (the
/// owner label changed in between, or the secret was deleted), it would give the pod a value
/// it must not have.
pub(super) fn stale_reference(pod: &PodView, secret_name: &str, names: &[&str]) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    for container in spec.all_containers() {
        for entry in container.env.iter().flatten() {
            let reference = entry
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref());
            if let Some(reference) = reference
                && reference.name == secret_name
                && !names.contains(&reference.key.as_str())
            {
                return Some(format!("{}/{}", container.name, entry.name));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn containers(value: Value) -> Vec<ContainerView> {
        serde_json::from_value(value).unwrap()
    }

    fn patch(writer: PatchWriter) -> Value {
        serde_json::from_slice(&writer.finish()).unwrap()
    }

    #[test]
    fn a_container_without_env_gets_every_reference_in_one_add() {
        let references = ReferenceWriter {
            names: &["A", "B"],
            secret_name: "asec-pod-x",
        };
        let mut writer = PatchWriter::default();
        let mut written = Written::default();
        references.containers(
            &mut writer,
            "containers",
            &containers(json!([{"name": "c"}])),
            &mut written,
        );
        assert_eq!(written.received, [true, true]);
        assert_eq!(
            patch(writer),
            json!([{"op": "add", "path": "/spec/containers/0/env", "value": [
                {"name": "A", "valueFrom": {"secretKeyRef": {"name": "asec-pod-x", "key": "A"}}},
                {"name": "B", "valueFrom": {"secretKeyRef": {"name": "asec-pod-x", "key": "B"}}}]}])
        );
    }

    #[test]
    fn env_set_by_the_pod_wins_and_our_own_entries_stand() {
        let references = ReferenceWriter {
            names: &["A", "B", "C"],
            secret_name: "asec-pod-x",
        };
        let mut writer = PatchWriter::default();
        let mut written = Written::default();
        let pod = containers(json!([{"name": "c", "env": [
            {"name": "A", "value": "the pod's own"},
            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "asec-pod-x", "key": "B"}}}]}]));
        references.containers(&mut writer, "containers", &pod, &mut written);
        assert_eq!(written.received, [false, true, true]);
        assert_eq!(written.skipped, ["c/A"]);
        assert_eq!(
            patch(writer),
            json!([{"op": "add", "path": "/spec/containers/0/env/-", "value":
                {"name": "C", "valueFrom": {"secretKeyRef": {"name": "asec-pod-x", "key": "C"}}}}])
        );
    }

    #[test]
    fn a_reference_to_this_secret_under_a_key_not_injected_now_is_stale() {
        let pod: PodView = serde_json::from_value(json!({"spec": {"containers": [{"name": "c", "env": [
            {"name": "OLD", "valueFrom": {"secretKeyRef": {"name": "asec-pod-x", "key": "OLD"}}}]}]}}))
        .unwrap();
        assert_eq!(
            stale_reference(&pod, "asec-pod-x", &["NEW"]).as_deref(),
            Some("c/OLD")
        );
        assert_eq!(stale_reference(&pod, "asec-pod-x", &["OLD"]), None);
        assert_eq!(stale_reference(&pod, "asec-pod-other", &["NEW"]), None);
    }
}
